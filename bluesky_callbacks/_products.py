"""Writing a planned run's product: masked chunks into a file the store serves, or sparse in tiled.

:func:`write_product` carries out a plan (:mod:`._plan`); used by :mod:`._process` and workflows.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from chx_masks.stores import http_status as _status

from ._chunks import _direct_encoded, _in_flight, _masked_chunk, _masked_encoded
from ._frames import prepare_mask
from ._lease import _COMPLETE, _WRITING, LEASE_S, LeaseLostError, _lease_product, _now
from ._plan import CHUNK_BYTES, ProcessingPlan, _Detector
from ._stores import ProcessingError, RunStore, _client, _store


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
    tasks: list[tuple[Callable[..., tuple[list[bytes], int]], tuple[Any, ...]]]
    if direct:
        tasks = [
            (_direct_encoded, (detector.files, a * per_event, b * per_event, mask, detector.dtype))
            for a, b in detector.chunks
        ]
    else:
        tasks = [
            (_masked_encoded, (runs, plan.run_uid, plan.stream, detector.data_key, a, b, mask))
            for a, b in detector.chunks
        ]
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
    tasks = [
        (_masked_chunk, (runs, plan.run_uid, plan.stream, detector.data_key, a, b, mask))
        for a, b in chunks
    ]
    nonzero = 0
    tail = (0,) * len(detector.event_shape)
    for index, (coords, data) in _in_flight(tasks, client, window):
        node.write_block(coords.astype(width, copy=False), data, (index, *tail))
        nonzero += int(data.size)
        on_block()
    return nonzero
