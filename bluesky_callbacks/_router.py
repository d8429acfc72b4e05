"""Callback that emits, for each raw run, a derived run whose detector frames are masked.

Subscribed to the RunEngine (``RE.subscribe``) for live processing and fed a
stored run's documents for replay; the same code serves both, so live and
replayed frames are identical.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from event_model import RunRouter

from chx_masks import MaskRegistry, MaskValidationError, RegistryUnavailableError

from ._deadline import DEFAULT_TIMEOUT, RegistryBreaker, breaker_for
from ._masked_run import _MaskedRun
from ._provenance import MASK_ERROR_KEY, _check_masks, _check_options

__all__ = ["MaskingRouter"]

logger = logging.getLogger(__name__)

Downstream = Callable[[str, dict], Any]

#: Seconds during which a start document that says the registry was
#: unreachable counts as news of an outage still going on (a live run); a
#: replayed older run is looked up as usual.
OUTAGE_NEWS_SECONDS = 60.0
StreamReader = Callable[[dict, str, int, int], Any]


def _as_callables(downstream: Downstream | Iterable[Downstream]) -> tuple[Downstream, ...]:
    if callable(downstream):
        return (downstream,)
    callables = tuple(downstream)
    if not callables or not all(callable(c) for c in callables):
        raise MaskValidationError(
            "downstream must be a callable (name, doc) or a list of them, e.g. "
            "a TiledWriter or a function; got "
            f"{downstream!r}."
        )
    return callables


class MaskingRouter:
    """Emit a masked derived run to ``downstream`` for every raw run it sees.

    For each run the composite mask of every detector is taken from the uids
    in the start document (``masks``, written by :class:`MaskProvenance`); a
    run without them gets the names in ``masks`` resolved ``as_of`` its start
    time, and the derived start document says so
    (``masks_resolved_as_of``). The composite is built once per run and
    prepared in each frame dtype once.

    The derived run: a start document with ``parent_uid`` (the raw run's uid)
    and the same ``masks`` and ``mask_uids``; descriptors; event pages whose
    masked fields hold ``frame * mask`` (masked pixels are 0, dtype and shape
    kept, frames inline, every other field passed through); a stop. Frames
    may arrive inline, through Resource/Datum (filled with
    ``handler_registry``) or through StreamResource/StreamDatum (HDF5).

    Parameters
    ----------
    registry : MaskRegistry or callable returning one
    downstream : callable or list of callables ``(name, doc)``
    masks : dict, optional
        ``{data_key: [mask names]}`` for runs whose start document records
        no masks.
    strict : bool
        Raise masking failures into the caller (the RunEngine). By default a
        failure is logged, the frames concerned are left out of the derived
        run (never passed on unmasked) and the derived stop document reports
        it (``exit_status="fail"``, ``masking_errors``).
    handler_registry : dict, optional
        Asset handlers (spec -> class) for Resource/Datum frames, added to
        the built-in ones (``AD_EIGER2``/``AD_EIGER``: DECTRIS Eiger series,
        see :mod:`bluesky_callbacks._frames`).
    root_map : dict, optional
        Passed to the filler for relocated Resource roots.
    unmasked_streams : {"pass", "drop"}
        What to do with streams that hold no masked detector.
    stream_reader : callable, optional
        ``(stream_resource, stream_name, start, stop) -> frames`` for
        StreamDatum frames; by default HDF5 files are read with h5py. Replay
        from tiled passes one that asks tiled, which reads any format it
        serves (HDF5, .npy sequences, TIFF) where the files live.
    frames : {"inline", "files"}
        How the derived run carries masked frames. "inline" (default): in
        its event pages, for in-process consumers and small detectors.
        "files": written to HDF5 files under ``directory`` in the Eiger's
        encoding (bitshuffle-LZ4, one chunk per frame, encoded on the decode
        threads) and referenced with StreamResource/StreamDatum, as
        ophyd-async detectors do, so a TiledWriter downstream stores
        references instead of every frame.
    directory : str or Path, optional
        Where ``frames="files"`` writes: ``<directory>/<derived run uid>/
        <data key>.h5``. The run store a TiledWriter writes to must read it
        (its ``readable_storage``).
    timeout : float or None
        Seconds a run start may wait for the registry (default 20); past
        that the run's detectors are reported unresolved and their frames
        withheld, and acquisition goes on. None waits as long as tiled retries.
        The router does not wait at all for a live run whose start document
        says the registry was unreachable when it opened, nor while the
        registry is known to be down (:attr:`breaker`, shared with the
        :class:`MaskProvenance` given the same registry or factory).

    A start document whose ``mask_names`` differ from what its ``masks``
    record chose (metadata given to ``RE(...)`` itself, merged after
    preprocessors) gets one warning: those names cannot choose masks.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from chx_masks import MaskRegistry
    >>> reg = MaskRegistry.embedded(tempfile.mkdtemp())
    >>> out = []
    >>> router = MaskingRouter(reg, lambda name, doc: out.append(name))
    >>> router("start", {"uid": "r1", "time": 0.0})
    >>> router("stop", {"uid": "s1", "time": 1.0, "run_start": "r1",
    ...                 "exit_status": "success"})
    >>> out
    ['start', 'stop']
    >>> reg.close()
    """

    def __init__(
        self,
        registry: MaskRegistry | Callable[[], MaskRegistry],
        downstream: Downstream | Iterable[Downstream],
        masks: Mapping[str, Sequence[str]] | None = None,
        *,
        strict: bool = False,
        handler_registry: Mapping[str, Any] | None = None,
        root_map: Mapping[str, str] | None = None,
        unmasked_streams: Literal["pass", "drop"] = "pass",
        stream_reader: StreamReader | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        frames: Literal["inline", "files"] = "inline",
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        if unmasked_streams not in ("pass", "drop"):
            raise MaskValidationError(
                f"unmasked_streams must be 'pass' or 'drop', not {unmasked_streams!r}."
            )
        if frames not in ("inline", "files"):
            raise MaskValidationError(f"frames must be 'inline' or 'files', not {frames!r}.")
        if frames == "files" and directory is None:
            raise MaskValidationError(
                "frames='files' needs directory=: where to write the masked frames (a "
                "directory the run store that stores the derived runs reads)."
            )
        self.frames = frames
        self.directory = None if directory is None else Path(directory).expanduser().absolute()
        _check_options(registry, timeout)
        self._registry = registry
        self.downstream = _as_callables(downstream)
        self.masks = _check_masks(masks, "masks")
        self.strict = strict
        self.handler_registry = dict(handler_registry or {})
        self.root_map = dict(root_map or {})
        self.unmasked_streams = unmasked_streams
        self.stream_reader = stream_reader
        self.timeout = timeout
        self._breaker = breaker_for(registry)
        self._runs: dict[str, _MaskedRun] = {}  # open runs, by raw start uid
        self._router = RunRouter([self._factory])

    @property
    def registry(self) -> MaskRegistry:
        """The registry in use (a factory given at construction is called now)."""
        if isinstance(self._registry, MaskRegistry):
            return self._registry
        return self._registry()

    @property
    def breaker(self) -> RegistryBreaker:
        """Whether the registry answers, and since when not; shared with its preprocessors."""
        return self._breaker

    def __call__(self, name: str, doc: dict) -> None:
        try:
            self._router(name, doc)
        except Exception:
            if self.strict:
                raise
            # Masking must never break acquisition: the run's own state
            # already recorded the failure where it could.
            logger.exception("MaskingRouter failed on a %s document", name)

    def flush(self) -> None:
        """Emit now every masked page still being decoded.

        Frames read from bitshuffle-LZ4 files are decoded on threads and their
        pages leave in order as they finish, and all of them before any other
        document of the run (its stop included); this waits for them now.

        Examples
        --------
        >>> import tempfile
        >>> from chx_masks import MaskRegistry
        >>> reg = MaskRegistry.embedded(tempfile.mkdtemp())
        >>> MaskingRouter(reg, lambda name, doc: None).flush()
        >>> reg.close()
        """
        for run in list(self._runs.values()):
            run._drain(everything=True)

    def _outage_news(self, start: Mapping[str, Any]) -> str | None:
        """Why the registry was unreachable when the run opened, if that was moments ago.

        Such a run spent the run start's one wait already: its detectors are
        not asked for again. An older run (replayed) is looked up as usual.
        """
        if time.time() - start.get("time", 0.0) < OUTAGE_NEWS_SECONDS:
            return _unreachable_at_open(start)
        return None

    def _factory(self, name: str, start: dict) -> tuple[list[Any], list[Any]]:
        run = _MaskedRun(self, start)
        self._runs[start["uid"]] = run
        return [run], []


def _unreachable_at_open(start: Mapping[str, Any]) -> str | None:
    """Why the registry was unreachable when the run opened, as its start recorded it.

    Examples
    --------
    >>> _unreachable_at_open({"masks": {"k": {"uids": [],
    ...     "error": "RegistryUnavailableError: no answer"}}})
    'RegistryUnavailableError: no answer'
    >>> _unreachable_at_open({"masks": {"k": {"uids": ["u"]}}}) is None
    True
    """
    unavailable = RegistryUnavailableError.__name__
    reasons = [start.get(MASK_ERROR_KEY) or ""] + [
        record.get("error") or ""
        for record in (start.get("masks") or {}).values()
        if isinstance(record, Mapping)
    ]
    for reason in reasons:
        if unavailable in reason:
            return reason[reason.index(unavailable) :]
    return None
