"""Stored runs through the masking path again: document replay and a lazy dask path.

Used after a scan (pre-processing, re-analysis) on runs read back from tiled
(bluesky-tiled-plugins ``BlueskyRun``, databroker 2.x) or any iterable of
``(name, doc)``; also where runs are stored: :func:`open_run_store`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chx_masks import CompositeMask, MaskNotFoundError, MaskRegistry

from ._frames import TiledStreamReader, prepare_mask, resolve_run_masks
from ._router import Downstream, MaskingRouter, _as_callables

if TYPE_CHECKING:
    import dask.array

__all__ = ["masked_frames", "open_run_store", "replay_masked", "run_composite"]


def open_run_store(directory: str | Path, *, readable_storage: Sequence[str | Path] = ()) -> Any:
    """A tiled catalog of Bluesky runs in a local directory, served in-process.

    TiledWriter writes runs into it; ``client[uid].documents()`` replays
    them (the ``application/json-seq`` exporter is registered).

    Parameters
    ----------
    directory : str or Path
        Where the catalog, arrays and tables live.
    readable_storage : paths
        Directories of detector files (HDF5, .npy) the runs refer to.

    Examples
    --------
    >>> import tempfile
    >>> client = open_run_store(tempfile.mkdtemp())
    >>> len(client)
    0
    >>> client.context.close()
    """
    from bluesky_tiled_plugins.exporters import json_seq_exporter
    from tiled.media_type_registration import default_serialization_registry
    from tiled.serialization import register_builtin_serializers

    from chx_masks.stores import open_embedded

    # The copy must hold tiled's own formats too: in a fresh process (a Dask
    # worker) they are registered only when tiled builds its first app.
    register_builtin_serializers()
    registry = copy.deepcopy(default_serialization_registry)
    registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)
    return open_embedded(
        Path(directory),
        tabular=True,
        readable_storage=readable_storage,
        specs=[{"name": "CatalogOfBlueskyRuns", "version": "3.0"}],
        serialization_registry=registry,
    )


def _documents(run: Any) -> Iterable[tuple[str, dict]]:
    if hasattr(run, "documents"):
        return run.documents()
    return run


def _stream_node(run: Any, stream: str, data_key: str) -> Any:
    """The stored array of ``data_key`` in ``stream``, whichever run layout the client gives.

    bluesky-tiled-plugins hands out the v3 layout (``run[stream][data_key]``)
    until something in the process asks for the v2 one (a databroker v1
    ``Header``, ``catalog.v2``, ``run.v2``): from then on *every* client in the
    process gets ``run[stream]["data"][data_key]``, because those accessors
    change the structure clients that all tiled clients share. The v2 path
    is looked up here rather than through ``run.v3``, which would switch the
    whole process back under the feet of the code that asked for v2.

    Raises
    ------
    KeyError
        Neither layout has ``data_key`` in ``stream``.
    """
    try:
        return run[stream][data_key]
    except KeyError:
        pass
    try:
        return run[stream]["data"][data_key]
    except KeyError:
        pass
    uid = (getattr(run, "metadata", None) or {}).get("start", {}).get("uid", "?")
    raise KeyError(
        f"Run {uid} has no {data_key!r} in its {stream!r} stream (neither "
        f"run[{stream!r}][{data_key!r}] nor run[{stream!r}]['data'][{data_key!r}]): "
        "check the data key (the descriptor's data_keys) and the stream name."
    )


def replay_masked(
    run: Any,
    downstream: Downstream | Iterable[Downstream],
    *,
    registry: MaskRegistry,
    masks: Mapping[str, Sequence[str]] | None = None,
    handler_registry: Mapping[str, Any] | None = None,
    root_map: Mapping[str, str] | None = None,
    strict: bool = True,
    progress: bool | Callable[[int, int | None], None] = False,
) -> str:
    """Replay a stored run through :class:`MaskingRouter`; return the derived run's uid.

    The masks are the uids the run recorded at its start (provenance, not
    "latest"); a run that recorded none gets ``masks`` resolved as of its
    start time. The masked frames equal those the live router emitted.

    Parameters
    ----------
    run : BlueskyRun or iterable of (name, doc)
        A run from tiled/databroker (its ``documents()`` are replayed), or
        the documents themselves.
    downstream : callable or list of callables ``(name, doc)``
    registry : MaskRegistry
    masks : dict, optional
        ``{data_key: [names]}`` for runs recorded without masks.
    handler_registry, root_map : optional
        For Resource/Datum frames.
    strict : bool
        Raise on a masking failure (the default here: nobody is acquiring).
    progress : bool or callable
        True shows a progress bar on stderr; a callable gets ``(events done,
        events expected or None)``.

    Examples
    --------
    >>> import tempfile
    >>> from chx_masks import MaskRegistry
    >>> reg = MaskRegistry.embedded(tempfile.mkdtemp())
    >>> docs = [("start", {"uid": "r", "time": 0.0}),
    ...         ("stop", {"uid": "s", "time": 1.0, "run_start": "r",
    ...                   "exit_status": "success"})]
    >>> out = []
    >>> uid = replay_masked(docs, lambda name, doc: out.append(doc), registry=reg)
    >>> out[0]["parent_uid"], out[0]["uid"] == uid
    ('r', True)
    >>> reg.close()
    """
    derived: list[str] = []

    def note_start(name: str, doc: dict) -> None:
        if name == "start":
            derived.append(doc["uid"])

    reader = None
    if hasattr(run, "documents") and hasattr(run, "metadata") and hasattr(run, "__getitem__"):
        # tiled serves the frames wherever the files are and in whatever
        # format TiledWriter registered (HDF5, .npy sequences, ...).
        reader = TiledStreamReader(lambda stream, key: _stream_node(run, stream, key))

    router = MaskingRouter(
        registry,
        [*_as_callables(downstream), note_start],
        masks,
        strict=strict,
        handler_registry=handler_registry,
        root_map=root_map,
        stream_reader=reader,
    )
    report = _progress_reporter(run, progress)
    done = 0
    try:
        for name, doc in _documents(run):
            router(name, doc)
            if name in ("event", "event_page", "stream_datum") and report is not None:
                done += _count(name, doc)
                report(done)
    finally:
        if report is not None:
            report(None)
    if not derived:
        raise MaskNotFoundError("The replayed run had no start document.")
    return derived[0]


def _count(name: str, doc: dict) -> int:
    if name == "event":
        return 1
    if name == "event_page":
        return len(doc["seq_num"])
    return doc["indices"]["stop"] - doc["indices"]["start"]


def _progress_reporter(
    run: Any, progress: bool | Callable[[int, int | None], None]
) -> Callable[[int | None], None] | None:
    if not progress:
        return None
    total = None
    metadata = getattr(run, "metadata", None)
    if metadata is not None:
        stop = metadata.get("stop") or {}
        total = sum((stop.get("num_events") or {}).values()) or None
    if callable(progress):

        def call(done: int | None) -> None:
            if done is not None:
                progress(done, total)

        return call
    from rich.progress import Progress

    bar = Progress(transient=True)
    task = bar.add_task("replaying", total=total)
    bar.start()

    def update(done: int | None) -> None:
        if done is None:
            bar.stop()
        else:
            bar.update(task, completed=done)

    return update


def run_composite(
    start: Mapping[str, Any],
    data_key: str,
    *,
    registry: MaskRegistry,
    masks: Mapping[str, Sequence[str]] | None = None,
) -> CompositeMask:
    """The composite a run's start document recorded for ``data_key``.

    Falls back to ``masks[data_key]`` resolved as of the run's start time
    for runs recorded without masks; see
    :func:`~bluesky_callbacks._frames.resolve_run_masks` (the one resolver of
    every masking path, which also checks the recorded sha256).

    Raises
    ------
    MaskNotFoundError
        No masks recorded for ``data_key`` and none given.
    MaskIntegrityError
        The recorded uids no longer give the recorded sha256.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from chx_masks import MaskRegistry
    >>> reg = MaskRegistry.embedded(tempfile.mkdtemp())
    >>> uid = reg.register_mask("eiger500K_single_image", "m",
    ...                         np.ones((514, 1030), bool))
    >>> record = reg.composite_from_uids([uid]).provenance()
    >>> start = {"uid": "r", "time": 4e9, "masks": {"eiger500K_single_image": record}}
    >>> run_composite(start, "eiger500K_single_image", registry=reg).uids == (uid,)
    True
    >>> reg.close()
    """
    found = resolve_run_masks(registry, start, [data_key], masks)[data_key]
    if isinstance(found, Exception):
        raise found
    return found


def masked_frames(
    run: Any,
    data_key: str,
    *,
    registry: MaskRegistry,
    masks: Mapping[str, Sequence[str]] | None = None,
    stream: str = "primary",
    frames_per_chunk: int | None = None,
) -> dask.array.Array:
    """The masked frames of a stored run as a lazy dask array (frames, rows, cols).

    Nothing is read until computed; each chunk is read from tiled and
    multiplied by the run's composite (prepared once, in the frames' dtype),
    so large runs can be processed in parallel with bounded memory.

    Examples
    --------
    >>> frames = masked_frames(run, "eiger4m_single_image", registry=reg)  # doctest: +SKIP
    >>> frames[:10].mean(axis=0).compute()  # doctest: +SKIP
    """
    import dask.array as da

    composite = run_composite(run.metadata["start"], data_key, registry=registry, masks=masks)
    array = _stream_node(run, stream, data_key)
    dtype = np.dtype(array.dtype)
    event_shape = tuple(array.shape[1:])  # (rows, cols) or (frames, rows, cols)
    mask = prepare_mask(composite, dtype, event_shape)
    if frames_per_chunk is None:
        event_bytes = dtype.itemsize * int(np.prod(event_shape))
        frames_per_chunk = max(1, (64 << 20) // max(1, event_bytes))
    raw = da.from_array(
        array,
        chunks=(frames_per_chunk, *event_shape),
        meta=np.empty((0,) * array.ndim, dtype=dtype),
        asarray=True,
        name=f"tiled-{run.metadata['start']['uid']}-{stream}-{data_key}",
    )
    return raw * mask
