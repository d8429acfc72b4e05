"""One raw run's masking: the state and work behind MaskingRouter, which makes one per run.

Emits the derived run (start, descriptors, masked pages, stop) to the router's downstream.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from event_model import DocumentRouter, Filler, compose_run

from chx_masks import ChxMasksError, CompositeMask

from ._decode import decode_chunk, decode_pool, decode_threads, raw_chunks, remask_chunk
from ._eiger import DATA_PATH
from ._frames import (
    HDF5StreamReader,
    handlers,
    prepare_mask,
    resolve_run_masks,
    rows_per_index,
)
from ._frames_file import _Encoded, _FramesFile
from ._kernel import FrameBuffers, Multiplier
from ._provenance import CHOSEN_BY_RUN, MASK_ERROR_KEY, RUN_MASKS_KEY

if TYPE_CHECKING:
    from concurrent.futures import Future

    from event_model import (
        Datum,
        DatumPage,
        Event,
        EventDescriptor,
        EventPage,
        Resource,
        RunStart,
        RunStop,
        StreamDatum,
        StreamResource,
    )

    from ._router import MaskingRouter

# The router's log, as before this module was split from it.
logger = logging.getLogger("bluesky_callbacks._router")


class _MaskedRun(DocumentRouter):
    """State and work of one raw run; emits its derived run."""

    def __init__(self, router: MaskingRouter, raw_start: dict) -> None:
        super().__init__()
        self._router = router
        self._errors: list[str] = []
        self._composites: dict[str, CompositeMask] = {}
        self._unresolved: set[str] = set()
        self._prepared: dict[tuple[str, np.dtype], np.ndarray] = {}
        self._buffers = FrameBuffers()
        self._multiply = Multiplier()
        self._dtypes: dict[str, np.dtype] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        # raw descriptor uid -> (derived descriptor uid or None, masked keys,
        # keys passed on, stream name)
        self._streams: dict[str, tuple[str | None, frozenset[str], frozenset[str], str]] = {}
        self._counts: dict[str, int] = {}
        self._stream_resources: dict[str, dict[str, Any]] = {}
        # Frames are read by the run's one reader of each kind (_frames).
        self._files = HDF5StreamReader(router.root_map)
        # Bitshuffle-LZ4 frames from files decode on the process's decode threads
        # (even one beats h5py: reading overlaps decoding); pages wait here, in
        # order, until decoded.
        self._threads = decode_threads()
        self._window = 2 * self._threads
        self._queue: deque[tuple[Any, ...]] = deque()
        self._filler = Filler(
            handlers(router.handler_registry), inplace=False, root_map=router.root_map
        )
        self._derived_start_uid: str | None = None
        self._unknown: str | None = None
        self._raw_start = raw_start
        # frames="files": derived descriptor uid -> (its document, masked keys);
        # one open file per masked key.
        self._derived: dict[str, tuple[EventDescriptor, frozenset[str]]] = {}
        self._frame_files: dict[str, _FramesFile] = {}

    # ---------------------------------------------------------------- helpers

    def _emit(self, name: str, doc: Mapping[str, Any]) -> None:
        # Frames still decoding go first: documents leave in the order they came.
        self._drain(everything=True)
        self._send(name, doc)

    def _send(self, name: str, doc: Mapping[str, Any]) -> None:
        for callback in self._router.downstream:
            try:
                # Every document is a plain dict at runtime (event_model's TypedDicts too).
                callback(name, cast(dict[str, Any], doc))
            except Exception as err:
                if self._router.strict:
                    raise
                logger.exception("downstream %r failed on %s", callback, name)
                self._errors.append(f"downstream {callback!r} failed on {name}: {err}")

    def _fail(self, what: str, err: BaseException, *, log: bool = True, note: bool = True) -> None:
        """``what`` went wrong ("cannot fill ..."): one log line, one entry in the stop.

        ``log=False`` where the line was written already; ``note=False`` where
        the derived stop says it otherwise (frames withheld, and why).
        """
        if self._router.strict:
            raise err
        if log:
            # An expected failure (registry down, mask missing) is one line;
            # only an unexpected one carries its traceback.
            expected = isinstance(err, ChxMasksError)
            logger.error(
                "Masking run %s: %s (%s: %s)",
                str(self._raw_start.get("uid"))[:8],
                what,
                type(err).__name__,
                err,
                exc_info=None if expected else err,
            )
        if note:
            self._errors.append(f"{what}: {type(err).__name__}: {err}")

    def _mask_for(self, key: str, frame: np.ndarray) -> np.ndarray:
        return self._mask_in(key, frame.dtype, frame.shape)

    def _mask_in(self, key: str, dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
        prepared = self._prepared.get((key, dtype))
        if prepared is None:
            # Prepared once per run and dtype.
            prepared = prepare_mask(self._composites[key], dtype, shape)
            self._prepared[(key, dtype)] = prepared
        return prepared

    def _masked(self, key: str, frames: Sequence[Any]) -> list[np.ndarray]:
        # Reused across pages once the previous page has been let go of.
        self._buffers.reserve(len(frames) * len(self._composites))
        out = []
        for frame in frames:
            if not isinstance(frame, np.ndarray):
                # Documents replayed as JSON carry nested lists; the
                # descriptor's dtype_numpy restores the detector's dtype.
                frame = np.asarray(frame, dtype=self._dtypes.get(key))
            mask = self._mask_for(key, frame)
            buffer = self._buffers.take(frame.shape, frame.dtype)
            out.append(self._multiply(frame, mask, buffer))
        return out

    # ------------------------------------------------------------ documents

    def start(self, doc: RunStart) -> None:
        # A start document carries whatever metadata the plan gave it.
        start = cast(dict[str, Any], doc)
        self._filler("start", start)
        recorded = start.get("masks") or {}
        when = datetime.fromtimestamp(start.get("time", time.time()), timezone.utc)
        # A run that found the registry unreachable when it opened, moments
        # ago, spent the run start's one wait already: its detectors are not
        # asked for again.
        unreachable = self._router._outage_news(start)
        records, resolved_as_of = self._build_composites(start, recorded, when, unreachable)
        self._unresolved = (set(recorded) | set(self._router.masks)) - set(self._composites)
        for key in sorted(self._unresolved):
            record = records.setdefault(key, {**recorded.get(key, {}), "uids": []})
            why = record.get("error") or unreachable or "no masks recorded or configured"
            # Said in the derived run; the raw run's start (or the failure
            # just logged) already told the user, so no second log line.
            self._errors.append(f"{key} frames withheld: it has no masks ({why})")
        # The run opened without knowing which masks its detectors needed:
        # every frame it cannot mask is withheld, never passed on as masked.
        self._unknown = start.get(MASK_ERROR_KEY)
        if self._unknown:
            self._errors.append(
                f"the run's masks are unknown ({self._unknown}): frames without masks are withheld"
            )
        _warn_ignored_mask_names(start)
        uids = [u for c in self._composites.values() for u in c.uids]
        metadata: dict[str, Any] = {
            key: start[key]
            for key in ("plan_name", "scan_id", "detectors", "sample", "beamline_id")
            if key in start
        }
        metadata.update(
            parent_uid=start["uid"],
            masks=records,
            mask_uids=list(dict.fromkeys(uids)),
            processing="chx_masks.MaskingRouter",
        )
        if resolved_as_of:
            metadata["masks_resolved_as_of"] = resolved_as_of
        if self._unknown:
            metadata[MASK_ERROR_KEY] = self._unknown
        bundle = compose_run(metadata=metadata)
        self._bundle = bundle
        self._derived_start_uid = bundle.start_doc["uid"]
        self._emit("start", bundle.start_doc)

    def _build_composites(
        self,
        start: dict[str, Any],
        recorded: Mapping[str, Any],
        when: datetime,
        unreachable: str | None,
    ) -> tuple[dict[str, dict], dict[str, str]]:
        """The composites of the run's detectors: by the uids its start recorded, else
        by the router's names as of ``when``; ``(records, resolved_as_of)`` for the
        derived start. A detector that fails gets a record saying why."""
        records: dict[str, dict] = {}
        resolved_as_of: dict[str, str] = {}
        by_uids = {key: record for key, record in recorded.items() if record.get("uids")}
        by_names = (
            {}
            if unreachable
            else {key: names for key, names in self._router.masks.items() if key not in by_uids}
        )
        found: dict[str, Any] = {}
        failed_together: Exception | None = None  # logged once, not once per detector
        if by_uids or by_names:
            try:
                # A RegistryUnavailableError leaves the whole run start
                # unresolved (and trips the breaker).
                dated = {**start, "time": when.timestamp()}
                found = self._router.breaker.call(
                    lambda registry: resolve_run_masks(
                        registry, dated, [*by_uids, *by_names], masks=by_names
                    ),
                    self._router.timeout,
                    "building the run's masks",
                    setting="MaskingRouter's timeout",
                )
            except Exception as err:
                self._fail(
                    f"cannot build the masks of {', '.join([*by_uids, *by_names])}", err, note=False
                )
                found = dict.fromkeys([*by_uids, *by_names], err)
                failed_together = err
        # Per detector: the record it starts from, and what a failure says.
        wanted = {
            key: (record, f"cannot rebuild the masks of {key} from uids {record['uids']}")
            for key, record in by_uids.items()
        }
        for key, names in by_names.items():
            wanted[key] = (
                {"names": names, "uids": [], "versions": [], "sha256": None},
                f"cannot resolve the masks {names} of {key} as of {when.isoformat()}",
            )
        for key, (base, failure) in wanted.items():
            result = found[key]
            if isinstance(result, Exception):
                if result is not failed_together:
                    self._fail(failure, result, note=False)
                records[key] = {**base, "error": f"{type(result).__name__}: {result}"}
                continue
            self._composites[key] = result
            records[key] = {**base, **result.provenance()}
            if key in by_names:
                resolved_as_of[key] = when.isoformat()
                logger.info(
                    "Run %s recorded no masks for %s; using %s as of its start %s",
                    start.get("uid"),
                    key,
                    list(result.uids),
                    when.isoformat(),
                )
        return records, resolved_as_of

    def descriptor(self, doc: EventDescriptor) -> None:
        self._filler("descriptor", cast(dict[str, Any], doc))
        data_keys = doc["data_keys"]
        masked = frozenset(k for k in data_keys if k in self._composites)
        # Keys whose data live in external assets are carried only when
        # masked (then filled and inline); the raw run keeps the rest.
        # A detector whose masks could not be resolved is withheld: its
        # frames must never reach a downstream that expects them masked.
        passed = frozenset(
            k
            for k in data_keys
            if k not in masked
            and k not in self._unresolved
            and not data_keys[k].get("external")
            and not (self._unknown and len(data_keys[k].get("shape") or ()) >= 2)
        )
        stream = doc.get("name", "primary")
        if not masked and self._router.unmasked_streams == "drop":
            self._streams[doc["uid"]] = (None, masked, passed, stream)
            return
        for key in masked:
            if data_keys[key].get("dtype_numpy"):
                self._dtypes[key] = np.dtype(data_keys[key]["dtype_numpy"])
            # A masked detector's frames have fixed dimensions (no None in its shape).
            self._shapes[key] = tuple(cast(Sequence[int], data_keys[key].get("shape") or ()))
        derived_keys = {}
        for key in (*sorted(masked), *sorted(passed)):
            data_key = dict(data_keys[key])
            data_key.pop("external", None)
            if key in masked and self._router.frames == "files":
                data_key["external"] = "STREAM:"
            derived_keys[key] = data_key
        derived = self._bundle.compose_descriptor(
            data_keys=derived_keys,
            name=stream,
            configuration=doc.get("configuration", {}),
            hints=doc.get("hints", {}),
            object_keys={
                obj: [k for k in keys if k in derived_keys]
                for obj, keys in doc.get("object_keys", {}).items()
            },
        ).descriptor_doc
        self._streams[doc["uid"]] = (derived["uid"], masked, passed, stream)
        self._derived[derived["uid"]] = (derived, masked)
        self._emit("descriptor", derived)

    # ``event``, ``event_page`` and ``datum`` return their document, as the
    # supertype's do; DocumentRouter passes the document on when they return None.
    def event(self, doc: Event) -> Event:
        self.event_page(
            {
                "uid": [doc["uid"]],
                "descriptor": doc["descriptor"],
                "seq_num": [doc["seq_num"]],
                "time": [doc["time"]],
                "data": {k: [v] for k, v in doc["data"].items()},
                "timestamps": {k: [v] for k, v in doc["timestamps"].items()},
                "filled": {k: [v] for k, v in doc.get("filled", {}).items()},
            }
        )
        return doc

    def event_page(self, doc: EventPage) -> EventPage:
        stream = self._streams.get(doc["descriptor"])
        if stream is None:
            return doc
        derived_uid, masked, passed, name = stream
        if derived_uid is None:
            return doc
        page = doc  # filled below where masked frames are external; doc is passed on as it came
        data = page["data"]
        present = [k for k in masked if k in data]
        if present and any(not all(page.get("filled", {}).get(k, [True])) for k in present):
            try:
                page = self._filler.event_page(page)
                data = page["data"]
            except Exception as err:
                self._fail(f"cannot fill {present} of seq_num {page['seq_num']}", err)
                present = []
        out = {k: data[k] for k in passed if k in data}
        for key in present:
            try:
                out[key] = self._masked(key, data[key])
            except Exception as err:
                self._fail(f"cannot mask {key} of seq_num {page['seq_num']}", err)
        if not out or any(k not in out for k in present):
            # Never pass on a page with a masked field left out or unmasked;
            # the failure is in the derived stop document.
            return doc
        self._emit_page(
            derived_uid,
            name,
            page["seq_num"],
            page["time"],
            out,
            {k: page["timestamps"][k] for k in out if k in page["timestamps"]},
        )
        return doc

    def _emit_page(
        self,
        descriptor: str,
        stream: str,
        seq_num: list[int],
        times: list[float],
        data: dict[str, list],
        timestamps: dict[str, list],
        *,
        queued: bool = False,
    ) -> None:
        send = self._send if queued else self._emit
        if self._router.frames == "files":
            try:
                data, timestamps = self._to_files(descriptor, seq_num, data, timestamps, send)
            except Exception as err:
                self._fail(f"cannot write frames of seq_num {list(seq_num)}", err)
                return
        page = {
            "uid": [str(uuid.uuid4()) for _ in seq_num],
            "descriptor": descriptor,
            "seq_num": list(seq_num),
            "time": list(times),
            "data": data,
            "timestamps": timestamps,
            "filled": {},
        }
        self._counts[stream] = self._counts.get(stream, 0) + len(seq_num)
        send("event_page", page)

    def _to_files(
        self,
        descriptor: str,
        seq_num: Sequence[int],
        data: dict[str, list],
        timestamps: dict[str, list],
        send: Callable[[str, Mapping[str, Any]], None],
    ) -> tuple[dict[str, list], dict[str, list]]:
        """Write the page's masked frames to files; StreamDatum for them; the rest."""
        doc, masked = self._derived[descriptor]
        for key in [k for k in data if k in masked]:
            frames = data.pop(key)
            timestamps.pop(key, None)
            out = self._frame_files.get(key)
            if out is None:
                assert self._router.directory is not None and self._derived_start_uid
                first_frame = frames[0]
                out = self._frame_files[key] = _FramesFile(
                    self._router.directory / self._derived_start_uid,
                    key,
                    first_frame.shape,
                    first_frame.dtype,
                )
                compose_stream_resource = self._bundle.compose_stream_resource
                assert compose_stream_resource is not None  # compose_run always makes one
                resource = compose_stream_resource(
                    mimetype="application/x-hdf5",
                    uri=out.uri,
                    data_key=key,
                    parameters={"dataset": DATA_PATH, "chunk_shape": (1, *out.frame_shape)},
                )
                out.resource = resource
                send("stream_resource", resource.stream_resource_doc)
            first = out.count
            out.write(frames, decode_pool(self._threads))
            # One StreamDatum per run of consecutive seq_nums (usually the page).
            begin = 0
            for i in range(1, len(seq_num) + 1):
                if i == len(seq_num) or seq_num[i] != seq_num[i - 1] + 1:
                    datum = out.resource.compose_stream_datum(
                        indices={"start": first + begin, "stop": first + i},
                        seq_nums={"start": seq_num[begin], "stop": seq_num[i - 1] + 1},
                        descriptor=doc,
                    )
                    send("stream_datum", datum)
                    begin = i
        return data, timestamps

    def resource(self, doc: Resource) -> None:
        self._filler("resource", cast(dict[str, Any], doc))

    def datum(self, doc: Datum) -> Datum:
        self._filler("datum", cast(dict[str, Any], doc))
        return doc

    def datum_page(self, doc: DatumPage) -> None:
        self._filler("datum_page", cast(dict[str, Any], doc))

    def stream_resource(self, doc: StreamResource) -> None:
        # Read as a plain dict (by HDF5StreamReader or the stream_reader given).
        self._stream_resources[doc["uid"]] = cast(dict[str, Any], doc)

    def stream_datum(self, doc: StreamDatum) -> None:
        stream = self._streams.get(doc["descriptor"])
        resource = self._stream_resources.get(doc["stream_resource"])
        if stream is None or resource is None:
            return
        derived_uid, masked, _passed, name = stream
        if derived_uid is None:
            return
        key = resource["data_key"]
        if key not in masked:
            return
        start, stop = doc["indices"]["start"], doc["indices"]["stop"]
        seq_num = list(range(doc["seq_nums"]["start"], doc["seq_nums"]["stop"]))
        if self._router.stream_reader is None:
            try:
                if self._decode(resource, key, start, stop, (derived_uid, name, seq_num)):
                    return
            except Exception as err:
                self._fail(f"cannot mask {key} frames {start}:{stop}", err)
                return
        try:
            if self._router.stream_reader is not None:
                frames = self._router.stream_reader(resource, name, start, stop)
            else:
                frames = self._files(resource, start, stop, self._shapes.get(key, ()))
            data = {key: self._masked(key, frames)}
        except Exception as err:
            self._fail(f"cannot mask {key} frames {start}:{stop}", err)
            return
        now = time.time()
        self._emit_page(
            derived_uid, name, seq_num, [now] * len(seq_num), data, {key: [now] * len(seq_num)}
        )

    def _decode(
        self, resource: dict, key: str, start: int, stop: int, page: tuple[str, str, list[int]]
    ) -> bool:
        """Queue frames ``start:stop`` for decoding and masking on the decode threads.

        Raw chunks are read here, in order (HDF5's lock is held only to read
        them); each frame is decoded and masked on a thread into its own
        output buffer; pages leave in order (:meth:`_drain`), at most
        ``_window`` frames behind. False (nothing queued) for a file whose
        layout is not one bitshuffle-LZ4 chunk per frame: read as before.
        """
        shape = self._shapes.get(key, ())
        per_index = rows_per_index(shape)
        dataset = self._files.dataset(resource, stop * per_index)
        if not self._files.decodable(resource, dataset):
            return False
        frame_shape = tuple(dataset.shape[1:])
        mask = self._mask_in(key, dataset.dtype, frame_shape)
        event_shape = tuple(shape) if len(shape) == 3 else frame_shape
        chunks = raw_chunks(dataset, start * per_index, stop * per_index)
        self._buffers.reserve(self._window + 2 * (stop - start) * per_index)
        outs = [self._buffers.take(event_shape, dataset.dtype) for _ in range(stop - start)]
        rows = [out.reshape(-1, *frame_shape) for out in outs]
        pool = decode_pool(self._threads)
        # The page's frames: the decoded buffers, or their chunks encoded again.
        frames: list[np.ndarray] | list[_Encoded] = outs
        futures: list[Future[Any]]
        if self._router.frames == "files" and per_index == 1:
            # Decoded, masked and encoded again in one task: the page then
            # carries the file's chunks (the frames never leave the thread).
            futures = [
                pool.submit(remask_chunk, chunk, rows[i][0], mask) for i, chunk in enumerate(chunks)
            ]
            frames = [_Encoded(f, event_shape, dataset.dtype) for f in futures]
        else:
            futures = [
                pool.submit(decode_chunk, chunk, rows[i // per_index][i % per_index], mask)
                for i, chunk in enumerate(chunks)
            ]
        self._queue.append((futures, frames, key, start, stop, page))
        self._drain(everything=False)
        return True

    def _drain(self, *, everything: bool) -> None:
        """Emit the queued pages whose frames are done, in order; wait for all if told,
        or for the oldest while more than ``_window`` frames are in flight."""
        while self._queue:
            futures, outs, key, start, stop, (derived_uid, name, seq_num) = self._queue[0]
            in_flight = sum(len(entry[0]) for entry in self._queue)
            if not (everything or in_flight > self._window or all(f.done() for f in futures)):
                return
            self._queue.popleft()
            try:
                for future in futures:
                    future.result()
            except Exception as err:
                self._fail(f"cannot mask {key} frames {start}:{stop}", err)
                continue
            now = time.time()
            self._emit_page(
                derived_uid,
                name,
                seq_num,
                [now] * len(seq_num),
                {key: outs},
                {key: [now] * len(seq_num)},
                queued=True,
            )

    def stop(self, doc: RunStop) -> None:
        self._drain(everything=True)
        # The raw start has a uid: MaskingRouter._factory filed this run under it.
        self._router._runs.pop(self._raw_start["uid"], None)
        self._files.close()
        for key, out in self._frame_files.items():
            try:
                out.close()
            except Exception as err:
                self._fail(f"cannot close the frames file of {key}", err)
        exit_status = doc.get("exit_status", "success")
        reason = doc.get("reason", "")
        if self._errors:
            exit_status = "fail"
            reason = "; ".join(filter(None, [reason, *self._errors]))[:10000]
        stop = {
            "uid": str(uuid.uuid4()),
            "time": time.time(),
            "run_start": self._derived_start_uid,
            "exit_status": exit_status,
            "reason": reason,
            "num_events": dict(self._counts),
            "masking_errors": list(self._errors),
        }
        self._emit("stop", stop)


def _warn_ignored_mask_names(start: Mapping[str, Any]) -> None:
    """One warning for ``mask_names`` that could not choose the run's masks.

    ``RE(plan, mask_names=...)`` (or ``RE.md``) reaches the start document
    after the preprocessors ran, so the masks record chose otherwise.
    """
    given = start.get(RUN_MASKS_KEY)
    if "masks" not in start or not isinstance(given, Mapping) or not given:
        return
    records = start.get("masks") or {}
    ignored = {}
    for key, names in given.items():
        record = records.get(key)
        if not isinstance(record, Mapping):
            record = {}
        if record.get("chosen_by") != CHOSEN_BY_RUN or list(record.get("names") or []) != (
            list(names) if isinstance(names, (list, tuple)) else names
        ):
            used = ", ".join(record.get("names") or []) or "no masks"
            ignored[key] = f"{key} used {used} ({record.get('chosen_by') or 'not chosen'})"
    if ignored:
        logger.warning(
            "Run %s: mask_names given to RE(...) cannot choose masks; put it in the plan's "
            "md=..., e.g. count([det], md={'mask_names': %r}). The run used: %s.",
            str(start.get("uid", "?"))[:8],
            dict(given),
            "; ".join(ignored.values()),
        )
