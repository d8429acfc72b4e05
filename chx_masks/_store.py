"""The registry's layout in its tiled container, and access to the nodes there.

The base of :class:`~chx_masks.MaskRegistry`'s roles (lineages, reads, active
sets, search, legacy adoption); ``chx-masks verify`` reads the layout constants.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._connection import _identity_of, _status, _translate
from ._content import (
    SEALED,
    check_metadata,
    check_name,
    mask_sha256,
    record_sha256,
    shape_str,
    utcnow,
)
from ._detectors import BUILTIN_DETECTORS
from ._errors import (
    ChxMasksError,
    DetectorNotFoundError,
    MaskExistsError,
    MaskNotFoundError,
    MaskValidationError,
)
from ._records import DetectorRecord

if TYPE_CHECKING:
    from ._arrays import _Arrays

# One log for the registry, whichever of its roles writes to it.
logger = logging.getLogger("chx_masks._registry")

MASKS = "masks"
DETECTORS = "detectors"
ACTIVE = "active"
CHANGES = "changes"
SCHEMA_VERSION = 1
MASK_SPEC = "chx_mask"
SLOT_SPEC = "chx_mask_slot"
ACTIVE_SPEC = "chx_mask_active_set"
CHANGE_SPEC = "chx_mask_change"
LEGACY_SPEC = "mask"
_MAX_CLAIM_ATTEMPTS = 64
_PAGE = 300  # tiled's largest page of search results
_TICK = timedelta(microseconds=1)
_LEGACY_KEYS = frozenset({"spec", "name", "detector", "version", "uid"})
_STORED_KEYS = frozenset(
    {
        "uid",
        "detector",
        "name",
        "sha256",
        "shape",
        "masked_pixels",
        "created_at",
        "created_by",
        "chx_masks",
        SEALED,
    }
)

# The role classes' doctests use the registry by its public name; set by
# chx_masks._registry once the class exists.
MaskRegistry: type


@dataclass(frozen=True)
class _Slot:
    name: str
    version: int
    kind: Literal["mask", "retired"]
    uid: str | None
    at: datetime
    created_by: str | None = None
    record_sha256: str | None = None

    @property
    def mask_uid(self) -> str:
        """The uid of the mask this slot claims (a retired slot claims none)."""
        if self.uid is None:
            raise MaskNotFoundError(f"{self.name} v{self.version} is retired: it has no mask.")
        return self.uid


@dataclass(frozen=True)
class _Stored:
    """What a mask's array node says about itself (immutable, so cached)."""

    uid: str
    detector: str
    name: str
    sha256: str
    shape: tuple[int, int]
    masked_pixels: int
    metadata: Mapping[str, Any]
    legacy_version: int | None = None
    legacy_key: str | None = None
    record_sha256: str | None = None


def create_or_conflict(
    action: str, location: str, create: Callable[..., object], /, *args: Any, **kwargs: Any
) -> bool:
    """Create a node with ``create(*args, **kwargs)``; False if its key is taken.

    tiled refuses an existing key with HTTP 409: that refusal, not a look-up
    before the write, is how a writer learns that another one was first.
    """
    try:
        with _translate(action, location):
            create(*args, **kwargs)
    except ChxMasksError:
        raise
    except Exception as err:
        if _status(err) != 409:
            raise
        return False
    return True


class _Store:
    """A registry's tiled container: its nodes, its detectors and its change log."""

    _root: Any
    location: str
    _owned: list[Any]
    _lock: threading.RLock
    _nodes: dict[str, Any]
    _stored: dict[str, _Stored]
    _unchecked: dict[str, _Stored]
    _arrays: _Arrays
    _identity: str | None
    _embedded: bool

    @property
    def identity(self) -> str:
        """Who this registry's writes are recorded as (``created_by``).

        On a tiled server, the principal the API key belongs to (as the
        server reports it); where the server names no principal (a
        single-user key, an embedded registry), the operating-system user
        as ``user@host``.

        Examples
        --------
        >>> import getpass, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     reg.identity.startswith(getpass.getuser() + "@")
        True
        """
        if self._identity is None:
            self._identity = _identity_of(self._root)
        return self._identity

    # -------------------------------------------------------------- detectors

    def detectors(self) -> list[DetectorRecord]:
        """Every detector known: the built-in CHX Eigers and registered ones.

        Examples
        --------
        >>> import tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     [d.name for d in reg.detectors()]
        ['eiger1m_single_image', 'eiger4m_single_image', 'eiger500K_single_image']
        """
        found = dict(BUILTIN_DETECTORS)
        container = self._container(DETECTORS)
        if container is not None:
            with self._translate("listing detectors"):
                for key, node in container.items():
                    found[key] = self._detector_from_node(key, node)
        return sorted(found.values(), key=lambda d: d.name)

    def get_detector(self, detector: str) -> DetectorRecord:
        """The record of one detector, or :class:`DetectorNotFoundError`.

        Examples
        --------
        >>> import tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     reg.get_detector("eiger4m_single_image").shape
        (2167, 2070)
        """
        check_name(detector, "detector name")
        node = self._detector_node(detector)
        if node is not None:
            return self._detector_from_node(detector, node)
        if detector in BUILTIN_DETECTORS:
            return BUILTIN_DETECTORS[detector]
        known = [d.name for d in self.detectors()]
        close = _close_names(detector, known)
        guess = f"Did you mean {' or '.join(map(repr, close))}? " if close else ""
        start = (
            f"Unknown detector {detector!r} in the registry at {self.location}. "
            f"{guess}Known: {', '.join(known)}. "
        )
        raise DetectorNotFoundError(
            f"{start}A new detector is registered with its frame shape: "
            f"register_detector({detector!r}, shape=(rows, cols)).",
            cli=f"{start}A new detector is registered with its frame shape: "
            f"`chx-masks detector add {detector} ROWS COLS`.",
        )

    def register_detector(
        self,
        detector: str,
        shape: Sequence[int],
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> DetectorRecord:
        """Make a detector known, with its frame shape (rows, cols).

        Registering again with the same shape returns the existing record; a
        different shape raises :class:`MaskExistsError`.

        Examples
        --------
        >>> import tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     reg.register_detector("pilatus800k_image", (1043, 981)).shape
        (1043, 981)
        """
        check_name(detector, "detector name")
        if (
            isinstance(shape, (str, bytes))
            or not isinstance(shape, Sequence)
            or len(shape) != 2
            or not all(
                isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0
                for n in shape
            )
        ):
            raise MaskValidationError(
                f"shape must be two positive integers (rows, cols), not {shape!r}."
            )
        shape = (int(shape[0]), int(shape[1]))
        user_md = check_metadata(metadata)
        existing = self._existing_detector(detector)
        if existing is not None:
            if existing.shape != shape:
                raise MaskExistsError(
                    f"Detector {detector!r} is already known with shape "
                    f"{shape_str(existing.shape)}; you gave {shape_str(shape)}. "
                    "Use another detector name for a different frame shape."
                )
            if existing.builtin:
                self._ensure_detector_node(existing)
            return self.get_detector(detector)
        record = DetectorRecord(detector, shape, user_md)
        self._ensure_detector_node(record)
        return self.get_detector(detector)

    def _existing_detector(self, detector: str) -> DetectorRecord | None:
        try:
            return self.get_detector(detector)
        except DetectorNotFoundError:
            return None

    def _ensure_detector_node(self, record: DetectorRecord) -> Any:
        node = self._detector_node(record.name)
        if node is not None:
            return node
        container = self._ensure_container(DETECTORS)
        if create_or_conflict(
            f"registering detector {record.name}",
            self.location,
            container.create_container,
            key=record.name,
            metadata={"shape": list(record.shape), "metadata": dict(record.metadata)},
        ):
            self._record_change(record.name, DETECTORS)
        else:
            existing = self._detector_from_node(record.name, self._node(DETECTORS, record.name))
            if existing.shape != record.shape:
                raise MaskExistsError(
                    f"Detector {record.name!r} was registered concurrently with shape "
                    f"{shape_str(existing.shape)}, not {shape_str(record.shape)}."
                )
        node = self._detector_node(record.name)
        assert node is not None
        return node

    @staticmethod
    def _detector_from_node(key: str, node: Any) -> DetectorRecord:
        md = node.metadata
        return DetectorRecord(
            key,
            tuple(md["shape"]),
            md.get("metadata", {}),
            builtin=key in BUILTIN_DETECTORS,
        )

    # ------------------------------------------------------------- change log

    def last_change(self) -> int | None:
        """The number of the last change recorded in the registry's change log.

        Every change that can alter what a name look-up returns (a mask
        version, a retirement, an active set, a new detector) appends the
        next number to ``changes/`` once it is stored. A reader that keeps
        what it resolved with this number can later ask
        :meth:`changed_since` (one request) instead of resolving again.
        None for a registry without a change log (never written by this
        version): then nothing can be kept.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     before = reg.last_change()
        ...     _ = reg.register_mask("eiger500K_single_image", "gaps",
        ...                           np.ones((514, 1030), bool))
        ...     before, reg.last_change(), reg.changed_since(reg.last_change())
        (None, 1, False)
        """
        container = self._container(CHANGES)
        if container is None:
            return None
        with self._translate("reading the change log"):
            # Sorted on a zero-padded string: catalogs sort JSON numbers as text.
            last = list(container.sort(("order", -1)).keys().head(1))
        return int(last[0]) if last else None

    def changed_since(self, change: int) -> bool:
        """Whether a change was recorded after number ``change`` (one request).

        The log's numbers are consecutive (each is claimed with tiled's 409),
        so the registry is unchanged exactly when ``change + 1`` is absent.
        A writer that died between storing a change and logging it leaves
        that change unlogged until the next one is logged: readers bound how
        long they trust an unchanged answer.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     a = np.ones((514, 1030), bool)
        ...     _ = reg.register_mask("eiger500K_single_image", "gaps", a)
        ...     seen = reg.last_change()
        ...     _ = reg.activate("eiger500K_single_image", ["gaps"])
        ...     reg.changed_since(seen)
        True
        """
        # One request: _node starts from the cached ``changes`` container.
        return self._node(CHANGES, str(change + 1)) is not None

    def _append_change(self, entry: dict[str, Any], action: str) -> int:
        """Append ``entry`` to the change log under the next number; that number."""
        from tiled.structures.core import Spec

        log = self._ensure_container(CHANGES)
        last = self.last_change()
        n = 0 if last is None else last + 1
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            md = {**entry, "n": n, "order": f"{n:015d}", "at": utcnow().isoformat()}
            if create_or_conflict(
                action,
                self.location,
                log.create_container,
                key=str(n),
                metadata=md,
                specs=[Spec(CHANGE_SPEC)],
            ):
                return n
            n += 1
        raise ChxMasksError("other writers kept taking the next change number")

    def _record_change(self, detector: str, key: str) -> None:
        """Append the next number to the change log, after the change it names."""
        try:
            self._append_change({"detector": detector, "key": key}, "recording the change")
        except Exception as err:
            # The change itself is stored; readers that kept an older answer
            # see it when the next change is logged, or when they stop
            # trusting it (MaskProvenance: after a minute).
            logger.warning(
                "Stored %s/%s but could not log the change (%s: %s); run starts in "
                "other processes may take up to a minute to see it.",
                detector,
                key,
                type(err).__name__,
                err,
            )

    # ------------------------------------------------------------------ nodes

    @contextmanager
    def _translate(self, action: str) -> Iterator[None]:
        with _translate(action, self.location):
            yield

    def _node(self, *path: str) -> Any | None:
        with self._lock:
            # The top-level containers are never removed: start from a cached
            # one rather than asking for it again.
            start = self._nodes.get(path[0]) if len(path) > 1 else None
        try:
            with self._translate(f"reading {'/'.join(path)}"):
                # One request for the whole path (tiled walks it server-side).
                if start is None:
                    return self._root[path]
                return start[path[1:]]
        except KeyError:
            return None

    def _container(self, key: str) -> Any | None:
        with self._lock:
            if key in self._nodes:
                return self._nodes[key]
        node = self._node(key)
        if node is not None:
            with self._lock:
                self._nodes[key] = node
        return node

    def _ensure_container(self, key: str) -> Any:
        node = self._container(key)
        if node is not None:
            return node
        create_or_conflict(
            f"creating {key}/",
            self.location,
            self._root.create_container,
            key=key,
            metadata={"chx_masks": SCHEMA_VERSION},
        )
        node = self._container(key)
        assert node is not None
        return node

    def _detector_node(self, detector: str) -> Any | None:
        cache_key = f"{DETECTORS}/{detector}"
        with self._lock:
            if cache_key in self._nodes:
                return self._nodes[cache_key]
        # One request for the path (None if either part is missing), not one
        # for ``detectors`` and another for the detector.
        node = self._node(DETECTORS, detector)
        if node is not None:
            with self._lock:
                self._nodes[cache_key] = node
        return node

    def _mask_node(self, uid: str) -> Any | None:
        """A uid's array node: found by a look-up before, under ``masks/``, or legacy."""
        return self._nodes.get(f"uid:{uid}") or self._node(MASKS, uid) or self._node(uid)

    @staticmethod
    def _keys(container: Any) -> Iterable[str]:
        return list(container.keys())

    def _stored_from_node(self, key: str, node: Any) -> _Stored:
        md = dict(node.metadata)
        if md.get("spec") == LEGACY_SPEC and "sha256" not in md:
            array = np.asarray(node.read())
            user = {k: v for k, v in md.items() if k not in _LEGACY_KEYS}
            return _Stored(
                uid=key,
                detector=str(md.get("detector")),
                name=str(md.get("name")),
                sha256=mask_sha256(array.astype(bool)),
                shape=tuple(array.shape),
                masked_pixels=int(array.size - np.count_nonzero(array)),
                metadata=user,
                legacy_version=md.get("version"),
                legacy_key=key,
            )
        user = {k: v for k, v in md.items() if k not in _STORED_KEYS}
        return _Stored(
            uid=md["uid"],
            detector=md["detector"],
            name=md["name"],
            sha256=md["sha256"],
            shape=tuple(md["shape"]),
            masked_pixels=int(md["masked_pixels"]),
            metadata=user,
            record_sha256=record_sha256(md),
        )


def _close_names(name: str, known: Sequence[str]) -> list[str]:
    """Known names a mistyped one is probably meant as (prefixes first).

    Examples
    --------
    >>> _close_names("eiger4m", ["eiger1m_single_image", "eiger4m_single_image"])
    ['eiger4m_single_image']
    """
    import difflib

    lowered = name.lower()
    prefixed = [k for k in known if k.lower().startswith(lowered) or lowered.startswith(k.lower())]
    return prefixed or difflib.get_close_matches(name, known, n=2, cutoff=0.6)


class _ArraysAsMetadata(Mapping[str, Any]):
    """tiled's structure clients, but ``array`` nodes as metadata-only clients."""

    def __init__(self, clients: Mapping[str, Any], metadata_client: type) -> None:
        self._clients, self._metadata_client = clients, metadata_client

    def __getitem__(self, key: str) -> Any:
        return self._metadata_client if key == "array" else self._clients[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._clients)

    def __len__(self) -> int:
        return len(self._clients)


def _metadata_view(container: Any) -> Any:
    """``container`` with its array children as metadata-only tiled clients.

    Finding and describing masks reads only metadata, but tiled's array client
    (``tiled.client.array``) imports dask, and dask.array imports pandas,
    xarray and scipy where they are installed: about a second of start-up for
    ``list``, ``show`` or ``history``. Arrays are read through the full client.
    """
    from tiled.client.base import BaseClient

    clients = container.structure_clients
    if isinstance(clients, _ArraysAsMetadata):
        return container
    return container.new_variation(structure_clients=_ArraysAsMetadata(clients, BaseClient))
