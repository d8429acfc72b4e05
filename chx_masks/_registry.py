"""The mask registry: versioned, searchable boolean masks stored in a tiled container.

Used directly by beamline code and through the module-level functions of
:mod:`chx_masks`. Layout inside the container the registry is given::

    masks/<uid>                 array node, bool, immutable; metadata: detector,
                                name, sha256, shape, masked_pixels, created_at
                                and the user's metadata (flat, searchable)
    detectors/<detector>        container; metadata: shape, metadata
    detectors/<detector>/<name>@<version>
                                empty container, a "slot": kind ("mask" or
                                "retired"), uid, at (UTC ISO 8601)
    active/<detector>/<version> empty container: the detector's active set
                                from ``at`` on; names (list), note, at

Every state change of a (detector, name) claims the next slot key. tiled
refuses an existing key with HTTP 409, so two writers can never claim the same
version: that refusal, not a search before the write, is what makes names
unique and version numbers gap-free under concurrent writers. A mask's array
is written under its fresh uid before its slot is claimed, so a uid that a
slot names always has its full array behind it.
"""

from __future__ import annotations

import functools
import json
import logging
import operator
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from ._content import (
    ADMIN_SCOPE,
    SEALED,
    TimeLike,
    check_metadata,
    check_name,
    check_storable,
    coerce_mask,
    mask_sha256,
    record_sha256,
    shape_str,
    to_datetime,
    utcnow,
)
from ._detectors import BUILTIN_DETECTORS
from ._errors import (
    ChxMasksError,
    DetectorNotFoundError,
    MaskExistsError,
    MaskIntegrityError,
    MaskInUseError,
    MaskNotFoundError,
    MaskPermissionError,
    MaskPurgedError,
    MaskValidationError,
    RegistryUnavailableError,
)
from ._records import ActiveSet, CompositeMask, DetectorRecord, MaskRecord, PackedMasks

if TYPE_CHECKING:
    import dask.array

__all__ = ["MaskRegistry"]

logger = logging.getLogger(__name__)

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


def _redact(uri: str) -> str:
    """Drop the query (which may carry an api_key) from a URI shown to people."""
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _split_api_key(uri: str, api_key: str | None) -> tuple[str, str | None]:
    """Take ``api_key`` out of a URI's query; an explicit ``api_key`` wins.

    Examples
    --------
    >>> _split_api_key("http://127.0.0.1:8000/masks?api_key=s3cret&x=1", None)
    ('http://127.0.0.1:8000/masks?x=1', 's3cret')
    >>> _split_api_key("http://127.0.0.1:8000", "k")
    ('http://127.0.0.1:8000', 'k')
    """
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    keys = [value for name, value in query if name == "api_key"]
    if not keys:
        return uri, api_key
    rest = urlencode([(name, value) for name, value in query if name != "api_key"])
    return urlunsplit(parts._replace(query=rest)), api_key or keys[-1]


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


class MaskRegistry:
    """Boolean detector masks with uids, versions and metadata, stored in tiled.

    Parameters
    ----------
    client : tiled.client.container.Container
        The tiled container that holds (or will hold) the registry. The
        registry creates ``masks`` and ``detectors`` inside it on first write.
    location : str, optional
        How to name this registry in messages (a URI or a directory).
    cache_bytes : int
        Memory for arrays already read (uids are immutable, so an array read
        once is never read again while it stays here).
    disk_cache : path, None or False
        A directory of local copies of arrays read before, by uid, so a new
        process need not fetch them again: ``$CHX_MASKS_CACHE_DIR`` or the
        user cache directory by default; False for none. A copy is used only
        if it matches the sha256 the registry holds for its uid.

    See Also
    --------
    MaskRegistry.embedded : a registry in a local directory, no server.
    MaskRegistry.from_uri : a registry on a tiled server.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> reg = MaskRegistry.embedded(tempfile.mkdtemp())
    >>> mask = np.ones((1065, 1030), dtype=bool)
    >>> mask[500:520, :] = False
    >>> uid = reg.register_mask("eiger1m_single_image", "gap", mask)
    >>> reg.get_masks()
    [('eiger1m_single_image', 'gap')]
    >>> bool((reg.get_mask("eiger1m_single_image", "gap").compute() == mask).all())
    True
    >>> reg.close()
    """

    def __init__(
        self,
        client: Any,
        *,
        location: str | None = None,
        cache_bytes: int = 1 << 30,
        disk_cache: str | Path | None | Literal[False] = None,
    ) -> None:
        self._root = client
        self.location = location or _redact(str(getattr(client, "uri", "tiled")))
        self._owned: list[Any] = []
        self._lock = threading.RLock()
        self._nodes: dict[str, Any] = {}
        # Records checked against the slot that claims them, and records read
        # (in one query for several) but not checked yet.
        self._stored: dict[str, _Stored] = {}
        self._unchecked: dict[str, _Stored] = {}
        # Arrays read, as packed bits: a 4M mask holds 0.56 MB here, not 4.5.
        self._arrays: OrderedDict[str, PackedMasks] = OrderedDict()
        self._composites: OrderedDict[tuple[str, ...], tuple] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._disk = _disk_cache_directory(disk_cache)
        self._identity: str | None = None
        # An embedded registry (a directory in this process) enforces nothing.
        self._embedded = False

    # ------------------------------------------------------------ construction

    @classmethod
    def from_uri(
        cls,
        uri: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        disk_cache: str | Path | None | Literal[False] = None,
    ) -> MaskRegistry:
        """Connect to a registry held in a container on a tiled server.

        Parameters
        ----------
        uri : str
            URI of the tiled container, e.g. ``"http://127.0.0.1:8000/masks"``
            or the server root ``"http://127.0.0.1:8000"``. A key given in
            the URI (``?api_key=...``) is taken out of it and used as
            ``api_key``, so it is never sent in a logged URL.
        api_key : str, optional
            A tiled API key; never shown in messages, reprs or logs.
        timeout : float
            Seconds to wait for any one request, for the connection as a
            whole, and for each step of a call once the server has stopped
            answering (tiled's own retries, up to ``$TILED_RETRY_TIMEOUT``,
            stop there), before giving up with RegistryUnavailableError. A
            server that answers, however slowly, is waited for.
        disk_cache : path, None or False
            Local copies of arrays read before (see `MaskRegistry`).

        Raises
        ------
        MaskPermissionError
            The server requires a key and none was given, or it refused the key.
        RegistryUnavailableError
            The server cannot be reached, or did not answer within ``timeout``.

        Examples
        --------
        >>> reg = MaskRegistry.from_uri("http://127.0.0.1:8000", api_key="secret")  # doctest: +SKIP
        """
        from concurrent.futures import Future

        import httpx
        from tiled.client.constructors import from_context
        from tiled.client.context import Context

        uri, api_key = _split_api_key(uri, api_key)
        location = _redact(uri)
        outcome: Future = Future()
        handover = threading.Lock()
        abandoned: list[bool] = []

        def connect() -> None:
            context = None
            try:
                with _translate("connecting", location):
                    context, path = Context.from_any_uri(
                        uri, api_key=api_key, timeout=httpx.Timeout(timeout)
                    )
                    if not context.authenticated and context.server_info.authentication.required:
                        raise MaskPermissionError(
                            f"The registry at {location} requires an API key and none was "
                            "given: set CHX_MASKS_API_KEY (or pass api_key=, or "
                            "--api-key on the command line) to a key from the facility."
                        )
                    client = from_context(context, node_path_parts=path, remember_me=False)
                    _bound_retries(context, timeout)
            except BaseException as err:
                if isinstance(context, Context):
                    context.close()
                outcome.set_exception(err)
                return
            with handover:
                if not abandoned:
                    outcome.set_result(client)
                    return
            context.close()  # the caller gave up waiting: nobody will close it

        # tiled retries a server that does not answer for up to
        # TILED_RETRY_TIMEOUT (45 s), and on the main thread it prints a bare
        # "Retrying..." line while it does. Connecting in a daemon thread bounds
        # the wait at `timeout` and keeps tiled quiet: the error below says it.
        threading.Thread(target=connect, name="chx-masks-connect", daemon=True).start()
        try:
            client = outcome.result(timeout=timeout)
        except TimeoutError:
            with handover:
                late = outcome.done()
                if not late:
                    abandoned.append(True)
            if not late:
                raise RegistryUnavailableError(
                    f"Cannot reach the mask registry at {location} while connecting (no "
                    f"answer within {timeout:g} s). Check that the tiled server at "
                    f"{location} is running and reachable."
                ) from None
            client = outcome.result()  # it finished just now: its client or its error
        except BaseException:
            # The connection's own error, or an interrupt while waiting for it.
            with handover:
                if not outcome.done():
                    abandoned.append(True)  # the thread closes what it opens
            if outcome.done() and outcome.exception() is None:
                outcome.result().context.close()
            raise
        registry = cls(client, location=location, disk_cache=disk_cache)
        registry._owned.append(client.context)
        return registry

    @classmethod
    def from_profile(
        cls, name: str, *, disk_cache: str | Path | None | Literal[False] = None
    ) -> MaskRegistry:
        """Connect through a tiled profile (``tiled profile list`` shows them).

        Parameters
        ----------
        name : str
            The profile's name.
        disk_cache : path, None or False
            Local copies of arrays read before (see `MaskRegistry`).

        Examples
        --------
        >>> reg = MaskRegistry.from_profile("chx")  # doctest: +SKIP
        """
        from tiled.client import from_profile as tiled_from_profile

        with _translate(f"opening tiled profile {name!r}", f"profile {name!r}"):
            try:
                client = tiled_from_profile(name)
            except KeyError as err:
                raise RegistryUnavailableError(
                    f"No tiled profile named {name!r}; `tiled profile list` shows "
                    "the profiles this machine has."
                ) from err
        registry = cls(client, location=f"profile {name!r}", disk_cache=disk_cache)
        registry._owned.append(client.context)
        return registry

    @classmethod
    def embedded(
        cls,
        path: str | Path | None = None,
        *,
        disk_cache: str | Path | None | Literal[False] = None,
    ) -> MaskRegistry:
        """Open (creating if needed) a registry in a local directory, no server.

        The directory holds a tiled SQLite catalog (``catalog.db``) and the
        mask arrays (``data/``); tiled runs in this process. Several processes
        may share one directory.

        Parameters
        ----------
        path : str or Path, optional
            Directory; by default ``$CHX_MASKS_DIR`` or the user data
            directory (``platformdirs.user_data_dir("chx-masks")``).
        disk_cache : path, None or False
            Local copies of arrays read before (see `MaskRegistry`).

        Examples
        --------
        >>> import tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     reg.get_masks()
        []
        """
        from ._embedded import default_directory, open_embedded

        directory = Path(path).expanduser() if path is not None else default_directory()
        client = open_embedded(directory)
        registry = cls(client, location=str(directory), disk_cache=disk_cache)
        registry._owned.append(client.context)
        registry._embedded = True
        # In this process, with tiled's in-process key: the user is who writes.
        registry._identity = _local_user()
        # Opening ends with the catalog's first query, which costs a new
        # process about 0.2 s, so that a run start does not pay for it.
        registry.last_change()
        return registry

    def close(self) -> None:
        """Release connections (and the in-process server of an embedded registry)."""
        while self._owned:
            context = self._owned.pop()
            try:
                context.close()
            except Exception:  # closing must not mask the caller's own error
                logger.debug("closing tiled context failed", exc_info=True)

    def __enter__(self) -> MaskRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MaskRegistry at {self.location}>"

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

    # ------------------------------------------------------------------ writes

    def register_mask(
        self,
        detector: str,
        name: str,
        mask: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        allow_binary: bool = False,
    ) -> str:
        """Start a new lineage ``(detector, name)`` with this mask; return its uid.

        The first lineage of a name is version 0; after a retired lineage of
        the same name, the next version number, so no (detector, name,
        version) is ever reused.

        Parameters
        ----------
        detector : str
            Image data key, e.g. ``"eiger4m_single_image"``.
        name : str
            Mask name; no '/', '\\', '?', '#', '%' or control characters.
        mask : array-like of bool
            Exactly the detector's shape; True = pixel kept, False = masked.
            Nested lists of bools are converted.
        metadata : dict, optional
            JSON-serializable; stored with this version and searchable.
        allow_binary : bool
            Accept an integer/float array holding only 0 and 1 (1 = kept).

        Raises
        ------
        MaskExistsError
            The name has an active lineage; use ``update_mask``.
        MaskValidationError, DetectorNotFoundError

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     uid = reg.register_mask("eiger500K_single_image", "chip_mask",
        ...                             np.ones((514, 1030), bool))
        ...     reg.describe(uid).version
        0
        """
        record = self.get_detector(detector)
        check_name(name)
        array = coerce_mask(mask, record.shape, detector, allow_binary=allow_binary)
        user_md = check_metadata(metadata)
        slots = self._slots(detector, [name]).get(name, [])
        self._refuse_active(detector, name, slots)
        return self._write_version(record, name, array, user_md, slots, "register")

    def update_mask(
        self,
        detector: str,
        name: str,
        mask: Any,
        *,
        metadata: Mapping[str, Any] | None = None,
        allow_binary: bool = False,
        force: bool = False,
    ) -> str:
        """Add the next version to the active lineage ``(detector, name)``.

        ``metadata=None`` keeps the previous version's metadata; pass ``{}``
        to store none. Concurrent updates each get their own version number.
        A mask identical to the current version is refused
        (:class:`MaskExistsError`, nothing written) unless ``force=True``:
        a new version that changes nothing only hides which one a run used.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     m = np.ones((514, 1030), bool)
        ...     _ = reg.register_mask("eiger500K_single_image", "bs", m)
        ...     m[:10] = False
        ...     uid = reg.update_mask("eiger500K_single_image", "bs", m)
        ...     reg.describe(uid).version
        1
        """
        record = self.get_detector(detector)
        check_name(name)
        array = coerce_mask(mask, record.shape, detector, allow_binary=allow_binary)
        slots = self._slots(detector, [name]).get(name, [])
        self._refuse_inactive(detector, name, slots)
        try:
            current: _Stored | None = self._stored_for(slots[-1].mask_uid)
        except MaskPurgedError:
            current = None  # the new version replaces a purged one
        if metadata is None:
            user_md = {} if current is None else dict(current.metadata)
        else:
            user_md = check_metadata(metadata)
        if current is not None and not force and mask_sha256(array) == current.sha256:
            said = (
                f"{detector}/{name} v{slots[-1].version} (uid {current.uid}) already "
                "holds exactly this mask; nothing was registered."
            )
            raise MaskExistsError(
                f"{said} Pass force=True to add an identical version anyway.",
                cli=f"{said} Add --force to register an identical version anyway.",
            )
        return self._write_version(record, name, array, user_md, slots, "update")

    def delete_mask(self, detector: str, name: str, *, force: bool = False) -> MaskRecord:
        """Retire the lineage ``(detector, name)``; return its last version.

        The name disappears from listings and current look-ups, and may be
        registered again. Every uid stays readable forever (runs recorded
        them): ``get_mask_by_uid``, ``describe``, ``history`` and ``as_of``
        look-ups still answer.

        A name the detector's active set uses is refused
        (:class:`MaskInUseError`, nothing written): every later run would
        fail to resolve it. ``force=True`` first records a new active set
        without the name, then retires it.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     uid = reg.register_mask("eiger500K_single_image", "old",
        ...                             np.ones((514, 1030), bool))
        ...     reg.delete_mask("eiger500K_single_image", "old").retired_at is not None
        True
        """
        self.get_detector(detector)
        check_name(name)
        slots = self._slots(detector, [name]).get(name, [])
        self._refuse_inactive(detector, name, slots)
        active = self.active_set(detector)
        if active is not None and name in active.names:
            if not force:
                rest = [n for n in active.names if n != name]
                said = (
                    f"{detector}/{name} is in the active set of {detector} "
                    f"(v{active.version}: {', '.join(active.names)}): every later run "
                    "would fail to resolve it, so it was not retired."
                )
                raise MaskInUseError(
                    f"{said} Activate a set without it first "
                    f"(activate({detector!r}, {rest!r})), or pass force=True to remove "
                    "it from the active set and retire it.",
                    cli=f"{said} Activate a set without it first (`chx-masks activate "
                    f"{detector} {' '.join(rest) if rest else '--none'}`), or add --force "
                    "to remove it from the active set and retire it.",
                )
            node = self._active_node(detector)
            self._claim_active(
                node,
                detector,
                tuple(n for n in active.names if n != name),
                f"{name} removed: its lineage was retired (deleted with force)",
            )
        node = self._detector_node(detector)
        slots = self._claim(
            node,
            detector,
            name,
            slots,
            kind="retired",
            uid=None,
            check=functools.partial(self._refuse_inactive, detector, name),
        )
        return self._record_at(slots, len(slots) - 2)

    def purge(self, uid: str, *, reason: str) -> MaskRecord:
        """Delete one registered mask's array and record for good, and log who and why.

        The one exception to "a uid resolves forever": for a mask that must
        not be kept (personal data, a wrong upload). Every run that recorded
        ``uid`` can no longer be reprocessed with it; afterwards reading it
        raises :class:`MaskPurgedError` (a :class:`MaskNotFoundError`) saying
        when, by whom and why it was purged. Its slot stays, so ``history``
        still shows the version.

        The change log records the purge first (``purged``, ``reason``,
        ``by``, ``sha256``); the server then deletes only a mask the log
        names, for a key that holds the admin scope (``admin:apikeys``).
        An embedded registry enforces nothing: whoever can write its
        directory may purge.

        Parameters
        ----------
        uid : str
            The mask's full uid (no prefix: a purge cannot be undone).
        reason : str
            Why, in words the facility's log will keep.

        Returns
        -------
        MaskRecord
            The version as it was registered.

        Raises
        ------
        MaskPermissionError
            The key does not hold ``admin:apikeys`` (nothing written).
        MaskNotFoundError
            No mask has this uid (:class:`MaskPurgedError`: it was purged before).
        MaskValidationError
            ``reason`` is empty or could not be stored (see ``check_metadata``).

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     uid = reg.register_mask("eiger500K_single_image", "m",
        ...                             np.ones((514, 1030), bool))
        ...     reg.purge(uid, reason="uploaded by mistake").version
        ...     try:
        ...         reg.get_mask_by_uid(uid)
        ...     except KeyError as err:
        ...         "purged" in str(err)
        0
        True
        """
        if not isinstance(reason, str) or not reason.strip():
            raise MaskValidationError(
                "A purge needs a reason (reason='...'): the change log keeps it."
            )
        try:
            reason = check_metadata({"reason": reason.strip()})["reason"]
        except MaskValidationError as err:
            raise MaskValidationError(f"The purge's reason cannot be stored: {err}") from None
        try:
            uuid.UUID(uid)
        except (ValueError, TypeError, AttributeError) as err:
            raise MaskNotFoundError(
                f"{uid!r} is not a full mask uid: a purge takes the whole uid "
                "(describe(prefix).uid gives it)."
            ) from err
        record = self._purgeable(uid)
        if not self._may_purge():
            said = (
                f"Only a key that holds the admin scope ({ADMIN_SCOPE}) may purge; "
                f"the key in use at {self.location} does not. Nothing was written."
            )
            raise MaskPermissionError(
                f"{said} Ask the facility's tiled admin, or use an admin key "
                "(MaskRegistry.from_uri(uri, api_key=...)).",
                cli=f"{said} Ask the facility's tiled admin, or pass an admin key "
                "(--api-key-file FILE or CHX_MASKS_API_KEY).",
            )
        if self._purge_record(uid) is None:
            self._append_change(
                {
                    "detector": record.detector,
                    "key": f"{record.name}@{record.version}",
                    "purged": uid,
                    "sha256": record.sha256,
                    "shape": list(record.shape),
                    "masked_pixels": record.masked_pixels,
                    "reason": reason,
                    "by": self.identity,
                },
                "recording the purge",
            )
        masks = self._container(MASKS)
        if masks is None:  # the record above was read from it: it vanished since
            raise MaskNotFoundError(f"The masks of {self.location} are gone; {uid} with them.")
        try:
            with self._translate(f"purging mask {uid}"):
                masks.delete_contents(uid, external_only=False)
        except MaskPermissionError as err:
            raise MaskPermissionError(
                f"The purge of {uid} is recorded in the change log, but the server refused "
                f"to delete it ({err}). A purge needs a key with {ADMIN_SCOPE}, "
                "delete:node and delete:revision; run it again with such a key (it "
                "reuses the record). Until then `chx-masks verify` reports it."
            ) from None
        with self._lock:
            self._stored.pop(uid, None)
            self._unchecked.pop(uid, None)
            self._arrays.pop(uid, None)
            self._nodes.pop(f"uid:{uid}", None)
            self._composites.clear()
        if self._disk is not None:
            (self._disk / f"{uid}.npy").unlink(missing_ok=True)
        return record

    def _purgeable(self, uid: str) -> MaskRecord:
        """The record of a mask that may be purged (its bytes need not check out)."""
        node = self._node(MASKS, uid)
        if node is None:
            self._refuse_purged(uid)
            raise MaskNotFoundError(f"No mask with uid {uid} in the registry at {self.location}.")
        md = node.metadata
        slots = self._slots(md.get("detector"), [md.get("name")]).get(md.get("name"), [])
        for i, slot in enumerate(slots):
            if slot.uid == uid:
                try:
                    return self._record_at(slots, i)
                except MaskIntegrityError:
                    # A forged or damaged record may be purged too.
                    return self._record_at(slots, i, self._stored_from_node(uid, node))
        raise MaskNotFoundError(
            f"uid {uid} holds a mask array but was never registered (an interrupted "
            "registration): `chx-masks verify --repair` removes it; there is nothing "
            "to purge."
        )

    def _may_purge(self) -> bool:
        """Whether this registry's key holds the admin scope (always, embedded)."""
        if self._embedded:
            return True
        return ADMIN_SCOPE in _key_scopes(self._root)

    def _purge_record(self, uid: str) -> Mapping[str, Any] | None:
        """The change-log entry that purged ``uid``, if any (one request)."""
        from tiled.queries import Eq

        log = self._container(CHANGES)
        if log is None:
            return None
        with self._translate(f"looking up purges of {uid}"):
            found = [
                dict(md) for md in (c.metadata for c in log.search(Eq("purged", uid)).values())
            ]
        return found[0] if found else None

    def _refuse_purged(self, uid: str) -> None:
        """Raise MaskNotFoundError saying when, by whom and why, if ``uid`` was purged."""
        purge = self._purge_record(uid)
        if purge is not None:
            raise MaskPurgedError(
                f"Mask {uid} ({purge.get('detector')}/{purge.get('key')}) was purged from "
                f"the registry at {self.location} on {purge.get('at')} by "
                f"{purge.get('by')}: {purge.get('reason')}. Its bytes are gone; runs that "
                "recorded it cannot be reprocessed with it.",
                purge=purge,
            )

    def _write_version(
        self,
        record: DetectorRecord,
        name: str,
        array: np.ndarray,
        user_md: dict[str, Any],
        slots: list[_Slot],
        action: Literal["register", "update"],
    ) -> str:
        node = self._ensure_detector_node(record)
        masks = self._ensure_container(MASKS)
        uid = str(uuid.uuid4())
        digest = mask_sha256(array)
        stored_md = {
            **user_md,
            "uid": uid,
            "detector": record.name,
            "name": name,
            "sha256": digest,
            "shape": list(array.shape),
            "masked_pixels": int(array.size - np.count_nonzero(array)),
            "created_at": utcnow().isoformat(),
            "created_by": self.identity,
            "chx_masks": SCHEMA_VERSION,
        }
        check = (
            functools.partial(self._refuse_active, record.name, name)
            if action == "register"
            else functools.partial(self._refuse_inactive, record.name, name)
        )
        self._store_mask(masks, uid, array, stored_md, f"writing mask {record.name}/{name}")
        self._claim_and_seal(node, masks, record.name, name, slots, uid, stored_md, check)
        self._remember(uid, array)
        return uid

    def _store_mask(
        self, masks: Any, uid: str, array: np.ndarray, metadata: dict[str, Any], action: str
    ) -> None:
        """Write a new, unsealed mask node and its array (steps 1 and 2)."""
        from tiled.structures.core import Spec

        with self._translate(action):
            masks.write_array(
                array, key=uid, metadata={**metadata, SEALED: False}, specs=[Spec(MASK_SPEC)]
            )

    def _claim_and_seal(
        self,
        node: Any,
        masks: Any,
        detector: str,
        name: str,
        slots: list[_Slot],
        uid: str,
        metadata: dict[str, Any],
        check: Any,
        version: int | None = None,
    ) -> None:
        """Claim the slot naming ``uid`` (step 3), then seal its node (step 4).

        See :mod:`chx_masks.policy` for what a crash between the steps leaves.
        """
        try:
            self._claim(
                node,
                detector,
                name,
                slots,
                kind="mask",
                uid=uid,
                check=check,
                version=version,
                record=record_sha256(metadata),
            )
        except BaseException:
            # The slot was not claimed, so nobody can know this uid: remove it
            # so that a refused call leaves nothing behind.
            self._discard(masks, uid)
            raise
        self._seal(masks, uid, metadata)

    def _seal(
        self, masks: Any, uid: str, metadata: dict[str, Any], *, strict: bool = False
    ) -> None:
        for attempt in range(3):
            try:
                with self._translate(f"sealing mask {uid}"):
                    node = masks[uid]
                    if node.metadata.get(SEALED, True) is True:
                        return  # sealed already (an earlier attempt got through)
                    node.replace_metadata(
                        metadata={**metadata, SEALED: True}, specs=[MASK_SPEC], drop_revision=True
                    )
                return
            except Exception as err:
                if attempt < 2:
                    continue
                if strict:
                    raise
                # The version is complete and served (bytes and record are
                # checked on every read); only the seal is missing.
                logger.warning(
                    "Registered mask %s but could not seal it (%s); `chx-masks verify "
                    "--repair` seals it.",
                    uid,
                    type(err).__name__,
                )

    def _claim(
        self,
        node: Any,
        detector: str,
        name: str,
        slots: list[_Slot],
        *,
        kind: Literal["mask", "retired"],
        uid: str | None,
        check: Any,
        version: int | None = None,
        record: str | None = None,
    ) -> list[_Slot]:
        """Claim the next slot (or exactly ``version``); return the slots after it.

        ``record`` is the hash of the claimed mask node's metadata
        (:func:`record_sha256`), kept in the slot so that reads can check it.
        """
        exact = version
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            check(slots)
            last = slots[-1] if slots else None
            version = exact if exact is not None else (last.version + 1 if last else 0)
            # Validity intervals must not run backwards even when writers'
            # clocks disagree: each slot starts after the one before.
            at = max(utcnow(), last.at + _TICK) if last else utcnow()
            slot_md: dict[str, Any] = {
                "detector": detector,
                "name": name,
                "version": version,
                "kind": kind,
                "uid": uid,
                "at": at.isoformat(),
                "created_by": self.identity,
            }
            if record is not None:
                slot_md["record_sha256"] = record
            if not self._create_new(
                node,
                f"{name}@{version}",
                slot_md,
                SLOT_SPEC,
                f"recording {detector}/{name} v{version}",
            ):
                if exact is not None:
                    raise MaskExistsError(
                        f"{detector}/{name} version {exact} was taken by another writer."
                    )
                slots = self._slots(detector, [name]).get(name, [])
                continue
            self._record_change(detector, f"{name}@{version}")
            return [*slots, _Slot(name, version, kind, uid, at, slot_md["created_by"], record)]
        raise ChxMasksError(
            f"Gave up claiming a version of {detector}/{name} after "
            f"{_MAX_CLAIM_ATTEMPTS} attempts: other writers kept taking it. Try again."
        )

    def _discard(self, masks: Any, uid: str) -> None:
        try:
            masks.delete_contents(uid, external_only=False)
        except Exception:
            logger.warning(
                "Could not remove unclaimed mask array %s; it is not registered "
                "under any name and can be deleted by hand.",
                uid,
                exc_info=True,
            )

    @staticmethod
    def _refuse_active(detector: str, name: str, slots: list[_Slot]) -> None:
        if slots and slots[-1].kind == "mask":
            last = slots[-1]
            said = (
                f"{detector}/{name} is already registered (version {last.version}, uid {last.uid})."
            )
            raise MaskExistsError(
                f"{said} Use update_mask({detector!r}, {name!r}, mask) to add a version, "
                "or delete_mask first to retire it.",
                cli=f"{said} Use `chx-masks update {detector} {name} FILE` to add a "
                f"version, or `chx-masks delete {detector} {name}` first to retire it.",
            )

    @staticmethod
    def _refuse_inactive(detector: str, name: str, slots: list[_Slot]) -> None:
        if not slots:
            raise MaskNotFoundError(
                f"No mask {detector}/{name} is registered; use register_mask to start it.",
                cli=f"No mask {detector}/{name} is registered; `chx-masks register "
                f"{detector} {name} FILE` starts it.",
            )
        if slots[-1].kind == "retired":
            said = f"{detector}/{name} was retired at {slots[-1].at:%Y-%m-%d %H:%M:%S} UTC;"
            raise MaskNotFoundError(
                f"{said} register_mask starts a new lineage of that name.",
                cli=f"{said} `chx-masks register {detector} {name} FILE` starts a new "
                "lineage of that name.",
            )

    # ------------------------------------------------------------------- reads

    def get_masks(
        self, detector: str | None = None, *, include_retired: bool = False
    ) -> list[tuple[str, str]]:
        """The (detector, name) of every active lineage, in registration order.

        Examples
        --------
        >>> import tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     reg.get_masks()
        []
        """
        if detector is not None:
            self.get_detector(detector)
            names = [detector]
        else:
            container = self._container(DETECTORS)
            with self._translate("listing detectors"):
                names = [] if container is None else list(self._keys(container))
        rows: list[tuple[datetime, str, str]] = []
        for det in names:
            for name, slots in self._slots(det).items():
                if slots[-1].kind == "mask":
                    start = _lineage_start(slots)
                    rows.append((slots[start].at, det, name))
                elif include_retired:
                    rows.append((slots[0].at, det, name))
        rows.sort()
        return [(det, name) for _, det, name in rows]

    def get_mask_uid(
        self,
        detector: str,
        name: str,
        *,
        version: int | None = None,
        as_of: TimeLike | None = None,
    ) -> str:
        """The uid of the current (or the given ``version``/``as_of``) mask.

        Examples
        --------
        >>> import numpy as np, tempfile, uuid
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     uid = reg.register_mask("eiger500K_single_image", "m",
        ...                             np.ones((514, 1030), bool))
        ...     reg.get_mask_uid("eiger500K_single_image", "m") == uid
        True
        """
        return self._resolve(detector, [name], version=version, as_of=as_of)[0].mask_uid

    def get_mask(
        self,
        detector: str,
        name: str,
        *,
        version: int | None = None,
        as_of: TimeLike | None = None,
    ) -> dask.array.Array:
        """The mask as a lazy dask array; ``.compute()`` gives NumPy bool.

        The name is resolved now (errors are raised here); the array is read
        and its sha256 verified when computed.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     _ = reg.register_mask("eiger500K_single_image", "m",
        ...                           np.ones((514, 1030), bool))
        ...     reg.get_mask("eiger500K_single_image", "m").shape
        (514, 1030)
        """
        slot = self._resolve(detector, [name], version=version, as_of=as_of)[0]
        return self._lazy(slot.mask_uid)

    def get_mask_by_uid(self, uid: str) -> dask.array.Array:
        """Any mask ever registered, retired or not, as a lazy dask array.

        ``uid`` may also be its first 8 or more characters (as ``chx-masks
        list`` shows), if no other uid starts with them.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     uid = reg.register_mask("eiger500K_single_image", "m",
        ...                             np.ones((514, 1030), bool))
        ...     _ = reg.delete_mask("eiger500K_single_image", "m")
        ...     bool(reg.get_mask_by_uid(uid).compute().all())
        True
        """
        return self._lazy(self._stored_for(uid).uid)

    def get_composite_mask(
        self,
        detector: str,
        names: Sequence[str],
        *,
        as_of: TimeLike | None = None,
    ) -> dask.array.Array:
        """The AND of the named masks (a pixel masked by any is masked), lazily.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     a = np.ones((514, 1030), bool); a[0] = False
        ...     b = np.ones((514, 1030), bool); b[:, 0] = False
        ...     _ = reg.register_mask("eiger500K_single_image", "a", a)
        ...     _ = reg.register_mask("eiger500K_single_image", "b", b)
        ...     m = reg.get_composite_mask("eiger500K_single_image", ["a", "b"])
        ...     int((~m.compute()).sum())
        1543
        """
        slots = self._resolve(detector, names, as_of=as_of)
        arrays = [self._lazy(s.mask_uid) for s in slots]
        return functools.reduce(operator.and_, arrays)

    def resolve_composite(
        self,
        detector: str,
        names: Sequence[str],
        *,
        as_of: TimeLike | None = None,
    ) -> CompositeMask:
        """Resolve names to exact versions and build their AND, once.

        Returns a frozen :class:`~chx_masks.CompositeMask` with names, uids,
        versions, the composite's sha256, the NumPy mask and ``explain()``.
        Looks names up in one query; arrays already read are not read again.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     a = np.ones((514, 1030), bool); a[0] = False
        ...     _ = reg.register_mask("eiger500K_single_image", "a", a)
        ...     c = reg.resolve_composite("eiger500K_single_image", ["a"])
        ...     c.versions, c.explain().masked_pixels
        ((0,), 1030)
        """
        when = None if as_of is None else to_datetime(as_of)
        slots = self._resolve(detector, names, as_of=when)
        uids = tuple(s.mask_uid for s in slots)
        composite, digest, components = self._and(uids)
        return CompositeMask(
            detector=detector,
            names=tuple(s.name for s in slots),
            uids=uids,
            versions=tuple(s.version for s in slots),
            sha256=digest,
            mask=composite,
            components=components,
            as_of=when,
        )

    def composite_from_uids(self, uids: Sequence[str]) -> CompositeMask:
        """Rebuild a composite from the exact uids a run recorded.

        Names and versions come from the registry's records; nothing is
        resolved by name, so a newer version registered since does not
        change the result.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     a = np.ones((514, 1030), bool); a[0] = False
        ...     uid = reg.register_mask("eiger500K_single_image", "a", a)
        ...     _ = reg.update_mask("eiger500K_single_image", "a", ~a)
        ...     reg.composite_from_uids([uid]).versions
        (0,)
        """
        if isinstance(uids, str) or not uids:
            raise MaskValidationError(f"Give a non-empty list of mask uids, not {uids!r}.")
        stored = [self._stored_for(uid) for uid in uids]
        detectors = sorted({s.detector for s in stored})
        if len(detectors) != 1:
            raise MaskValidationError(
                f"The uids belong to several detectors ({', '.join(detectors)}); a "
                "composite is built for one detector."
            )
        versions = self._versions_of(detectors[0], stored)
        key = tuple(s.uid for s in stored)
        composite, digest, components = self._and(key)
        return CompositeMask(
            detector=detectors[0],
            names=tuple(s.name for s in stored),
            uids=key,
            versions=versions,
            sha256=digest,
            mask=composite,
            components=components,
        )

    def _versions_of(self, detector: str, stored: Sequence[_Stored]) -> tuple[int | None, ...]:
        """The version of each stored mask of one detector, in one slot query."""
        if all(s.legacy_key is not None for s in stored):
            return tuple(s.legacy_version for s in stored)
        slots = self._slots(detector, sorted({s.name for s in stored}))
        versions = []
        for s in stored:
            if s.legacy_key is not None:
                versions.append(s.legacy_version)
                continue
            found = [slot.version for slot in slots.get(s.name, []) if slot.uid == s.uid]
            if not found:
                raise MaskNotFoundError(
                    f"uid {s.uid} holds a mask array but was never registered under "
                    f"{s.detector}/{s.name} (an interrupted registration); it has no "
                    "version and was never handed out."
                )
            versions.append(found[0])
        return tuple(versions)

    def describe(self, uid: str) -> MaskRecord:
        """Everything known about one uid: who, which version, when, content.

        ``uid`` may also be a unique prefix of 8 or more characters.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     uid = reg.register_mask("eiger500K_single_image", "m",
        ...                             np.ones((514, 1030), bool),
        ...                             metadata={"sample": "silica"})
        ...     r = reg.describe(uid)
        ...     r.name, r.version, r.masked_pixels, r.metadata["sample"]
        ('m', 0, 0, 'silica')
        """
        stored = self._stored_for(uid)
        if stored.legacy_key is not None:
            return self._legacy_record(stored)
        slots = self._slots(stored.detector, [stored.name]).get(stored.name, [])
        for i, slot in enumerate(slots):
            if slot.uid == stored.uid:
                return self._record_at(slots, i)
        raise MaskNotFoundError(
            f"uid {uid} holds a mask array but was never registered under "
            f"{stored.detector}/{stored.name} (an interrupted registration); it "
            "has no version and was never handed out."
        )

    def history(self, detector: str, name: str) -> list[MaskRecord]:
        """Every version of ``(detector, name)``, oldest first, retired included.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     m = np.ones((514, 1030), bool)
        ...     _ = reg.register_mask("eiger500K_single_image", "m", m)
        ...     m[0] = False
        ...     _ = reg.update_mask("eiger500K_single_image", "m", m)
        ...     [(r.version, r.active) for r in reg.history("eiger500K_single_image", "m")]
        [(0, False), (1, True)]
        """
        self.get_detector(detector)
        check_name(name)
        slots = self._slots(detector, [name]).get(name, [])
        if not slots:
            raise MaskNotFoundError(f"No mask {detector}/{name} was ever registered.")
        return [self._record_at(slots, i) for i, s in enumerate(slots) if s.kind == "mask"]

    def search(
        self,
        *,
        detector: str | None = None,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        all_versions: bool = False,
        include_retired: bool = False,
    ) -> list[MaskRecord]:
        """Find masks by detector, name and metadata values (equality).

        Parameters
        ----------
        detector, name : str, optional
            Restrict to one detector / one mask name.
        metadata : dict, optional
            ``{key: value}`` that must all match; dotted keys reach into
            nested dicts (``{"sample.name": "silica"}``).
        all_versions : bool
            Include superseded versions, not only current ones.
        include_retired : bool
            Include versions of retired lineages.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     _ = reg.register_mask("eiger500K_single_image", "m",
        ...                           np.ones((514, 1030), bool),
        ...                           metadata={"beamtime": "2026-3"})
        ...     [r.name for r in reg.search(metadata={"beamtime": "2026-3"})]
        ['m']
        """
        from tiled.queries import Eq

        masks = self._container(MASKS)
        if masks is None:
            return []
        results = masks
        if detector is not None:
            results = results.search(Eq("detector", check_name(detector, "detector name")))
        if name is not None:
            results = results.search(Eq("name", check_name(name)))
        for key, value in check_query(metadata).items():
            results = results.search(Eq(key, value))
        with self._translate("searching masks"):
            found = [
                self._stored_from_node(key, node) for key, node in _metadata_view(results).items()
            ]
        with self._lock:
            # What a mask's node says of itself never changes: the records
            # below need not ask for each one again.
            self._unchecked.update((s.uid, s) for s in found if s.legacy_key is None)
        by_detector: dict[str, set[str]] = {}
        for stored in found:
            by_detector.setdefault(stored.detector, set()).add(stored.name)
        records = []
        for det, names in sorted(by_detector.items()):
            for slots in self._slots(det, sorted(names)).values():
                for i, slot in enumerate(slots):
                    if slot.kind != "mask" or not any(s.uid == slot.uid for s in found):
                        continue
                    record = self._record_at(slots, i)
                    if record.retired_at is not None and not include_retired:
                        continue
                    if record.superseded_at is not None and not all_versions:
                        continue
                    records.append(record)
        records.sort(key=lambda r: (r.detector, r.name, r.version))
        return records

    # ------------------------------------------------------------ active sets

    def activate(
        self, detector: str, names: Sequence[str], *, note: str | None = None
    ) -> ActiveSet:
        """Choose which masks apply to ``detector`` from now on; return the new set.

        The choice is stored in the registry with its own history, so every
        IPython session, callback and worker sees it at its next run start
        without a restart. Each name must be an active lineage now. Pass
        ``[]`` (or use :meth:`deactivate`) to withdraw the registry's choice.

        Parameters
        ----------
        detector : str
            Image data key.
        names : list of str
            Mask names, composed with AND in this order.
        note : str, optional
            Why (e.g. the sample); kept with this version of the choice.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     _ = reg.register_mask("eiger500K_single_image", "gaps",
        ...                           np.ones((514, 1030), bool))
        ...     s = reg.activate("eiger500K_single_image", ["gaps"], note="sample A")
        ...     reg.active_set("eiger500K_single_image").names, s.version
        (('gaps',), 0)
        """
        self.get_detector(detector)
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise MaskValidationError(
                f"names must be a list of mask names, not {names!r}; write [{names!r}]."
            )
        names = [check_name(n) for n in names]
        if names:
            self._resolve(detector, names)
        if note is not None and not isinstance(note, str):
            raise MaskValidationError(f"note must be a string, not {type(note).__name__}.")
        check_storable(note, "note")
        container = self._ensure_container(ACTIVE)
        node = self._active_node(detector)
        if node is None:
            try:
                with self._translate(f"recording the active set of {detector}"):
                    container.create_container(key=detector, metadata={"detector": detector})
            except ChxMasksError:
                raise
            except Exception as err:
                if _status(err) != 409:
                    raise
            node = self._active_node(detector)
        return self._claim_active(node, detector, tuple(names), note)

    def deactivate(self, detector: str, *, note: str | None = None) -> ActiveSet:
        """Withdraw the registry's choice of masks for ``detector`` (an empty set).

        Examples
        --------
        >>> import tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     reg.deactivate("eiger500K_single_image").names
        ()
        """
        return self.activate(detector, [], note=note)

    def active_set(self, detector: str, *, as_of: TimeLike | None = None) -> ActiveSet | None:
        """The detector's current active set (or the one in force ``as_of``), or None.

        Examples
        --------
        >>> import tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     reg.active_set("eiger4m_single_image") is None
        True
        """
        self.get_detector(detector)
        when = None if as_of is None else to_datetime(as_of)
        if when is not None:
            earlier = [s for s in self.active_history(detector) if s.at <= when]
            return earlier[-1] if earlier else None
        if self._container(ACTIVE) is None:
            return None
        node = self._active_node(detector)
        if node is None:
            return None
        with self._translate(f"reading the active set of {detector}"):
            try:
                # The newest node is the latest version: each version is
                # created only after the one before exists. (Sorting on the
                # "version" metadata is text order on SQLite: "9" > "10".)
                child = node.sort(("", -1)).values().first()
            except IndexError:
                return None
        return _active_from_metadata(child.metadata)

    def active_history(self, detector: str) -> list[ActiveSet]:
        """Every active set the detector has had, oldest first.

        Examples
        --------
        >>> import tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     _ = reg.deactivate("eiger500K_single_image", note="no sample")
        ...     [s.note for s in reg.active_history("eiger500K_single_image")]
        ['no sample']
        """
        self.get_detector(detector)
        if self._container(ACTIVE) is None:
            return []
        node = self._active_node(detector)
        if node is None:
            return []
        with self._translate(f"reading the active sets of {detector}"):
            found = [_active_from_metadata(child.metadata) for child in node.values()]
        return sorted(found, key=lambda s: s.version)

    def active_sets(self) -> dict[str, ActiveSet]:
        """The current active set of every detector that has one (empty ones too).

        Examples
        --------
        >>> import tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     reg.active_sets()
        {}
        """
        container = self._container(ACTIVE)
        if container is None:
            return {}
        with self._translate("listing active sets"):
            # One request (a page of keys, not counted first) unless there are
            # more detectors than tiled's largest page.
            detectors = list(container.keys().head(_PAGE))
            if len(detectors) == _PAGE:
                detectors = list(container.keys())
        found = {}
        for detector in detectors:
            current = self.active_set(detector)
            if current is not None:
                found[detector] = current
        return found

    def missing_names(self, detector: str, names: Sequence[str]) -> tuple[str, ...]:
        """The ``names`` that are not a current mask of ``detector`` (one query).

        A name is missing when it was never registered or its lineage was
        retired; an active set or a fallback that names it cannot be resolved.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     _ = reg.register_mask("eiger500K_single_image", "gaps",
        ...                           np.ones((514, 1030), bool))
        ...     reg.missing_names("eiger500K_single_image", ["gaps", "beamstop"])
        ('beamstop',)
        """
        self.get_detector(detector)
        names = [check_name(n) for n in names]
        if not names:
            return ()
        slots = self._slots(detector, names)
        return tuple(n for n in names if not slots.get(n) or slots[n][-1].kind != "mask")

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

    def _create_new(
        self, parent: Any, key: str, metadata: dict[str, Any], spec: str, action: str
    ) -> bool:
        """Create the container ``key``; False if it exists already (tiled's 409)."""
        from tiled.structures.core import Spec

        try:
            with self._translate(action):
                parent.create_container(key=key, metadata=metadata, specs=[Spec(spec)])
        except ChxMasksError:
            raise
        except Exception as err:
            if _status(err) != 409:
                raise
            return False
        return True

    def _append_change(self, entry: dict[str, Any], action: str) -> int:
        """Append ``entry`` to the change log under the next number; that number."""
        log = self._ensure_container(CHANGES)
        last = self.last_change()
        n = 0 if last is None else last + 1
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            md = {**entry, "n": n, "order": f"{n:015d}", "at": utcnow().isoformat()}
            if self._create_new(log, str(n), md, CHANGE_SPEC, action):
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

    def _active_node(self, detector: str) -> Any | None:
        """The container of a detector's active sets (cached: it is never removed)."""
        cache_key = f"{ACTIVE}/{detector}"
        with self._lock:
            if cache_key in self._nodes:
                return self._nodes[cache_key]
        node = self._node(ACTIVE, detector)
        if node is not None:
            with self._lock:
                self._nodes[cache_key] = node
        return node

    def _claim_active(
        self, node: Any, detector: str, names: tuple[str, ...], note: str | None
    ) -> ActiveSet:
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            last = self.active_set(detector)
            version = last.version + 1 if last else 0
            at = max(utcnow(), last.at + _TICK) if last else utcnow()
            md = {
                "detector": detector,
                "version": version,
                "names": list(names),
                "note": note,
                "at": at.isoformat(),
                "created_by": self.identity,
            }
            if not self._create_new(
                node, str(version), md, ACTIVE_SPEC, f"recording the active set of {detector}"
            ):
                continue
            self._record_change(detector, f"{ACTIVE}/{version}")
            return _active_from_metadata(md)
        raise ChxMasksError(
            f"Gave up recording the active set of {detector} after "
            f"{_MAX_CLAIM_ATTEMPTS} attempts: other writers kept changing it. Try again."
        )

    # --------------------------------------------------------- legacy layout

    def adopt_legacy(self, *, dry_run: bool = False) -> list[MaskRecord]:
        """Bring masks of the older flat CHX layout into the registry, keeping uids.

        The older layout kept array nodes directly in the container, keyed by
        uid, with metadata ``{"spec": "mask", "name", "detector", "version"}``.
        Those uids resolve even before adoption; adoption copies each into
        ``masks/<uid>`` with a sha256 and claims its (detector, name, version)
        so name look-ups, listings and history see it. Unknown detectors are
        registered with the legacy arrays' shape. Adopting twice is harmless.

        Returns the records of the masks adopted now (or, with ``dry_run``,
        the ``(detector, name, version, uid)`` that would be, as records
        without times).
        """
        from tiled.queries import Eq

        with self._translate("listing legacy masks"):
            legacy = [
                self._stored_from_node(key, node)
                for key, node in self._root.search(Eq("spec", LEGACY_SPEC)).items()
            ]
        legacy.sort(key=lambda s: (s.detector, s.name, s.legacy_version or 0))
        adopted: list[MaskRecord] = []
        for stored in legacy:
            try:
                check_name(stored.detector, "detector name")
                check_name(stored.name)
            except MaskValidationError as err:
                # Adopting it would list a name no look-up accepts; its uid
                # keeps resolving as it is.
                logger.warning("Not adopting legacy mask %s: %s", stored.uid, err)
                continue
            if self._node(MASKS, stored.uid) is not None:
                continue
            if dry_run:
                adopted.append(self._legacy_record(stored))
                continue
            record = self._existing_detector(stored.detector)
            if record is None:
                record = self.register_detector(
                    stored.detector, stored.shape, metadata={"origin": "legacy adoption"}
                )
            array = coerce_mask(self._read(stored.uid), record.shape, record.name)
            slots = self._slots(record.name, [stored.name]).get(stored.name, [])
            wanted = stored.legacy_version or 0
            if any(s.version >= wanted for s in slots):
                logger.warning(
                    "Not adopting legacy %s/%s v%s (uid %s): the registry already has "
                    "that version or a later one.",
                    stored.detector,
                    stored.name,
                    wanted,
                    stored.uid,
                )
                continue
            if self._adopt_one(record, stored, array, slots, wanted):
                adopted.append(self.describe(stored.uid))
        return adopted

    def _adopt_one(
        self,
        record: DetectorRecord,
        stored: _Stored,
        array: np.ndarray,
        slots: list[_Slot],
        version: int,
    ) -> bool:
        """Adopt one legacy mask; False if another process adopted it first."""

        node = self._ensure_detector_node(record)
        masks = self._ensure_container(MASKS)
        stored_md = {
            **_adoptable_metadata(stored.metadata),
            "uid": stored.uid,
            "detector": record.name,
            "name": stored.name,
            "sha256": mask_sha256(array),
            "shape": list(array.shape),
            "masked_pixels": int(array.size - np.count_nonzero(array)),
            "created_at": utcnow().isoformat(),
            "adopted_from": stored.legacy_key,
            "chx_masks": SCHEMA_VERSION,
        }
        try:
            self._store_mask(
                masks, stored.uid, array, stored_md, f"adopting legacy mask {stored.uid}"
            )
        except ChxMasksError:
            raise
        except Exception as err:
            if _status(err) != 409:
                raise
            return False  # adopted concurrently by another process
        # Keep the legacy version number, even where older ones are missing.
        self._claim_and_seal(
            node,
            masks,
            record.name,
            stored.name,
            slots,
            stored.uid,
            stored_md,
            lambda _slots: None,
            version=version,
        )
        return True

    def _legacy_record(self, stored: _Stored) -> MaskRecord:
        return MaskRecord(
            uid=stored.uid,
            detector=stored.detector,
            name=stored.name,
            version=stored.legacy_version,
            registered_at=None,
            superseded_at=None,
            retired_at=None,
            sha256=stored.sha256,
            shape=stored.shape,
            masked_pixels=stored.masked_pixels,
            metadata=stored.metadata,
            legacy=True,
        )

    # --------------------------------------------------------------- internals

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
        try:
            with self._translate(f"creating {key}/"):
                self._root.create_container(key=key, metadata={"chx_masks": SCHEMA_VERSION})
        except ChxMasksError:
            raise
        except Exception as err:
            if _status(err) != 409:
                raise
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
        try:
            with self._translate(f"registering detector {record.name}"):
                container.create_container(
                    key=record.name,
                    metadata={"shape": list(record.shape), "metadata": dict(record.metadata)},
                )
            self._record_change(record.name, DETECTORS)
        except ChxMasksError:
            raise
        except Exception as err:
            if _status(err) != 409:
                raise
            existing = self._detector_from_node(record.name, self._node(DETECTORS, record.name))
            if existing.shape != record.shape:
                raise MaskExistsError(
                    f"Detector {record.name!r} was registered concurrently with shape "
                    f"{shape_str(existing.shape)}, not {shape_str(record.shape)}."
                ) from err
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

    @staticmethod
    def _keys(container: Any) -> Iterable[str]:
        return list(container.keys())

    def _slots(self, detector: str, names: Sequence[str] | None = None) -> dict[str, list[_Slot]]:
        """All slots of the given names of one detector, in one query."""
        from tiled.queries import In

        node = self._detector_node(detector)
        if node is None:
            return {}
        results = node if names is None else node.search(In("name", list(names)))
        found: dict[str, list[_Slot]] = {}
        with self._translate(f"looking up masks of {detector}"):
            for key, child in results.items():
                md = child.metadata
                if key != f"{md.get('name')}@{md.get('version')}":
                    # Not a slot the registry wrote (its key is the claim).
                    logger.warning(
                        "Ignoring %s/%s: its key does not match its name and version.",
                        detector,
                        key,
                    )
                    continue
                slot = _Slot(
                    md["name"],
                    int(md["version"]),
                    md["kind"],
                    md.get("uid"),
                    datetime.fromisoformat(md["at"]),
                    md.get("created_by"),
                    md.get("record_sha256"),
                )
                found.setdefault(slot.name, []).append(slot)
        for slots in found.values():
            slots.sort(key=lambda s: s.version)
        return found

    def _resolve(
        self,
        detector: str,
        names: Sequence[str],
        *,
        version: int | None = None,
        as_of: TimeLike | None = None,
    ) -> list[_Slot]:
        """Map names to the slots a look-up selects, in the order given."""
        self.get_detector(detector)
        if isinstance(names, str):
            raise MaskValidationError(
                f"names must be a list of mask names, not the string {names!r}; write [{names!r}]."
            )
        if not isinstance(names, Iterable):
            raise MaskValidationError(
                f"names must be a list of mask names, not {type(names).__name__}."
            )
        names = [check_name(n) for n in names]
        if not names:
            raise MaskValidationError("Give at least one mask name.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise MaskValidationError(f"Mask names repeat: {duplicates}; give each once.")
        if version is not None and as_of is not None:
            raise MaskValidationError("Give version= or as_of=, not both.")
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, (int, np.integer))
        ):
            raise MaskValidationError(f"version must be an integer, not {version!r}.")
        when = None if as_of is None else to_datetime(as_of)
        all_slots = self._slots(detector, names)
        chosen = []
        for name in names:
            slots = all_slots.get(name, [])
            if not slots:
                registered = ", ".join(n for d, n in self.get_masks(detector)) or "none"
                raise MaskNotFoundError(
                    f"No mask {detector}/{name} in the registry at {self.location}. "
                    f"Registered for {detector}: {registered}."
                )
            chosen.append(_select(detector, name, slots, version, when))
        # Each record against the slot that claims it, before any is used.
        self._prefetch([slot.mask_uid for slot in chosen])
        for slot in chosen:
            self._stored_for(slot.mask_uid, slot)
        return chosen

    def _record_at(self, slots: list[_Slot], i: int, stored: _Stored | None = None) -> MaskRecord:
        slot = slots[i]
        assert slot.uid is not None
        purged: Mapping[str, Any] | None = None
        if stored is None:
            try:
                stored = self._stored_for(slot.uid, slot)
            except MaskPurgedError as err:
                purged = err.purge  # the version stays in the history
        following = slots[i + 1] if i + 1 < len(slots) else None
        retired_at = superseded_at = None
        if following is not None:
            if following.kind == "retired":
                retired_at = following.at
            else:
                superseded_at = following.at
        if stored is None:
            assert purged is not None
            return MaskRecord(
                uid=slot.uid,
                detector=str(purged.get("detector")),
                name=slot.name,
                version=slot.version,
                registered_at=slot.at,
                superseded_at=superseded_at,
                retired_at=retired_at,
                sha256=str(purged.get("sha256")),
                shape=tuple(purged.get("shape") or (0, 0)),
                masked_pixels=int(purged.get("masked_pixels") or 0),
                metadata={"purged": {k: purged.get(k) for k in ("at", "by", "reason")}},
                created_by=slot.created_by,
            )
        return MaskRecord(
            uid=slot.uid,
            detector=stored.detector,
            name=slot.name,
            version=slot.version,
            registered_at=slot.at,
            superseded_at=superseded_at,
            retired_at=retired_at,
            sha256=stored.sha256,
            shape=stored.shape,
            masked_pixels=stored.masked_pixels,
            metadata=stored.metadata,
            created_by=slot.created_by,
        )

    def _stored_for(self, uid: str, slot: _Slot | None = None) -> _Stored:
        """A uid's record, checked against the slot that claims it (looked up if not given)."""
        if not isinstance(uid, str):
            raise MaskNotFoundError(f"A uid is a string, not {type(uid).__name__}.")
        with self._lock:
            if uid in self._stored:
                stored = self._stored[uid]
                if slot is not None:
                    self._check_record(stored, slot)
                return stored
            unchecked = self._unchecked.pop(uid, None)
        if unchecked is not None:
            stored = unchecked
            self._check_record(stored, slot)
            with self._lock:
                self._stored[uid] = stored
            return stored
        try:
            uuid.UUID(uid)
        except ValueError as err:
            if _UID_PREFIX.fullmatch(uid) is None:
                raise MaskNotFoundError(
                    f"{uid!r} is not a mask uid (a UUID such as "
                    "'73f07be0-d535-41db-9258-2dd01e1ac37b', or its first 8 or more "
                    "characters)."
                ) from err
            return self._stored_for(self._uid_from_prefix(uid))
        masks = self._container(MASKS)
        node = None
        if masks is not None:
            try:
                with self._translate(f"reading {MASKS}/{uid}"):
                    node = _metadata_view(masks)[uid]
            except KeyError:
                pass
        if node is None:
            node = self._node(uid)
            if node is None or node.metadata.get("spec") != LEGACY_SPEC:
                self._refuse_purged(uid)
                raise MaskNotFoundError(
                    f"No mask with uid {uid} in the registry at {self.location}."
                )
        stored = self._stored_from_node(uid, node)
        if stored.legacy_key is None:
            self._check_record(stored, slot)
            # Only registry records are immutable; a legacy one changes when
            # any process adopts it.
            with self._lock:
                self._stored[uid] = stored
        return stored

    def _check_record(self, stored: _Stored, slot: _Slot | None) -> None:
        """Refuse a record that is not what its slot says was registered."""
        from tiled.queries import Eq

        if slot is None:
            node = self._detector_node(stored.detector)
            claims: list[Any] = []
            if node is not None:
                with self._translate(f"looking up the version of {stored.uid}"):
                    claims = [
                        md
                        for key, md in (
                            (k, c.metadata) for k, c in node.search(Eq("uid", stored.uid)).items()
                        )
                        if key == f"{md.get('name')}@{md.get('version')}"
                    ]
            if not claims:
                raise MaskNotFoundError(
                    f"uid {stored.uid} holds a mask array but was never registered under "
                    f"{stored.detector}/{stored.name} (an interrupted registration); it "
                    "has no version and was never handed out."
                )
            expected = claims[0].get("record_sha256")
        else:
            expected = slot.record_sha256
        if expected is not None and expected != stored.record_sha256:
            raise MaskIntegrityError(
                f"Mask {stored.uid} ({stored.detector}/{stored.name}) fails its integrity "
                "check: its metadata record is not the one registered (the slot that "
                "claims it keeps the record's hash). It was rewritten after "
                "registration; it is not served. Run `chx-masks verify` and restore the "
                "registry from a backup."
            )

    def _uid_from_prefix(self, prefix: str) -> str:
        """The one registered uid that starts with ``prefix`` (one query)."""
        from tiled.queries import Like

        masks = self._container(MASKS)
        found: list[str] = []
        if masks is not None:
            # Hex digits and dashes only, so nothing in the pattern is a wildcard.
            query = Like("uid", prefix.lower() + "%")
            with self._translate(f"looking up uid {prefix}"):
                found = list(masks.search(query).keys().head(5))
        if not found:
            raise MaskNotFoundError(
                f"No mask uid starts with {prefix!r} in the registry at {self.location}."
            )
        if len(found) > 1:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise MaskNotFoundError(
                f"The uid prefix {prefix!r} is ambiguous: {shown} start with it. Give "
                "more characters."
            )
        return found[0]

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

    def _remember(self, uid: str, array: np.ndarray) -> None:
        with self._lock:
            self._put_array(uid, array)

    def _put_array(self, uid: str, array: np.ndarray) -> None:
        self._arrays[uid] = PackedMasks([array])
        self._arrays.move_to_end(uid)
        total = sum(a.nbytes for a in self._arrays.values())
        while total > self._cache_bytes and len(self._arrays) > 1:
            _, dropped = self._arrays.popitem(last=False)
            total -= dropped.nbytes

    def _read(self, uid: str) -> np.ndarray:
        """A verified, read-only NumPy array of a uid (cached: uids are immutable).

        Each call unpacks a new array from the cached bits, so nothing holds
        it after its caller is done with it.
        """
        with self._lock:
            if uid in self._arrays:
                self._arrays.move_to_end(uid)
                return self._arrays[uid][0]
        stored = self._stored_for(uid)
        array = self._from_disk(stored)
        if array is None:
            array = self._fetch(uid, stored)
            self._to_disk(stored, array)
        with self._lock:
            self._put_array(uid, array)
        array.flags.writeable = False
        return array

    def _fetch(self, uid: str, stored: _Stored) -> np.ndarray:
        """Read a uid's array from tiled and verify it against its sha256."""
        node = self._nodes.get(f"uid:{uid}") or self._node(MASKS, uid) or self._node(uid)
        try:
            with self._translate(f"reading mask {uid}"):
                raw = _read_whole(node)
        except (MaskPermissionError, RegistryUnavailableError):
            raise
        except Exception as err:
            raise MaskIntegrityError(
                f"Mask {uid} ({stored.detector}/{stored.name}) cannot be read back "
                f"({type(err).__name__}): its stored bytes are damaged or missing. It "
                "is not served; restore it from a backup or register the mask again."
            ) from err
        if stored.legacy_key is not None:
            array = raw.astype(bool)
        else:
            array = raw
            if array.dtype != np.bool_ or array.shape != stored.shape:
                raise MaskIntegrityError(
                    f"Mask {uid} reads back as {array.dtype} {shape_str(array.shape)}, "
                    f"not bool {shape_str(stored.shape)}: the stored array was altered. "
                    "Do not use it; register the mask again from its source."
                )
        digest = mask_sha256(array)
        if digest != stored.sha256:
            raise MaskIntegrityError(
                f"Mask {uid} ({stored.detector}/{stored.name}) fails its integrity "
                f"check: stored sha256 {stored.sha256[:12]}..., content hashes to "
                f"{digest[:12]}.... The stored bytes were changed after registration; "
                "it is not served. Restore it from a backup or register the mask again."
            )
        return array

    def _cache_path(self, stored: _Stored) -> Path | None:
        if self._disk is None or stored.legacy_key is not None:
            return None
        return self._disk / f"{stored.uid}.npy"

    def _from_disk(self, stored: _Stored) -> np.ndarray | None:
        """A local copy of the array if there is one and it matches its sha256."""
        path = self._cache_path(stored)
        if path is None:
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if (
            array.dtype != np.bool_
            or array.shape != stored.shape
            or mask_sha256(array) != stored.sha256
        ):
            logger.warning("Ignoring the damaged local copy %s of mask %s", path, stored.uid)
            return None
        return array

    def _to_disk(self, stored: _Stored, array: np.ndarray) -> None:
        path = self._cache_path(stored)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            with open(partial, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(partial, path)
        except OSError:
            # A cache that cannot be written costs speed, never correctness.
            logger.debug("Could not keep a local copy of mask %s", stored.uid, exc_info=True)

    def _prefetch(self, uids: Sequence[str]) -> None:
        """Learn what the registry says of several uids in one query, not one each."""
        with self._lock:
            missing = [u for u in uids if u not in self._stored and u not in self._unchecked]
        masks = self._container(MASKS) if len(missing) > 1 else None
        if masks is None:
            return
        from tiled.queries import In

        with self._translate("looking up masks by uid"):
            # Iterated, not list()-ed: list() would first ask tiled to count.
            found = [item for item in masks.search(In("uid", missing)).items()]  # noqa: C416
        for key, node in found:
            stored = self._stored_from_node(key, node)
            if stored.uid == key:
                with self._lock:
                    self._unchecked[key] = stored
                    self._nodes[f"uid:{key}"] = node

    def _and(self, uids: tuple[str, ...]) -> tuple[np.ndarray, str, PackedMasks]:
        """The read-only AND of the uids' masks, its sha256 and the components."""
        with self._lock:
            built = self._composites.get(uids)
        if built is None:
            self._prefetch(uids)
            with self._lock:
                fetching = any(uid not in self._arrays for uid in uids)
            composite = None
            for uid in uids:
                # One unpacked component at a time: the components are kept
                # packed (PackedMasks), the composite unpacked.
                component = self._read(uid)
                if composite is None:
                    composite = component.copy()
                else:
                    np.logical_and(composite, component, out=composite)
                del component
            assert composite is not None
            composite.flags.writeable = False
            components = PackedMasks.concat(self._packed(uid) for uid in uids)
            if fetching:
                _return_freed_memory()
            built = (composite, mask_sha256(composite), components)
            with self._lock:
                # Uids are immutable, so the composite of the same uids is the
                # same array: the next run costs one query and no AND.
                self._composites[uids] = built
                while len(self._composites) > 16:
                    self._composites.popitem(last=False)
        return built

    def _packed(self, uid: str) -> PackedMasks:
        with self._lock:
            kept = self._arrays.get(uid)
        return kept if kept is not None else PackedMasks([self._read(uid)])

    def _read_copy(self, uid: str) -> np.ndarray:
        return self._read(uid).copy()

    def _lazy(self, uid: str) -> dask.array.Array:
        import dask
        import dask.array as da

        stored = self._stored_for(uid)
        task = dask.delayed(self._read_copy, pure=True)(uid, dask_key_name=f"chx-mask-read-{uid}")
        return da.from_delayed(task, shape=stored.shape, dtype=bool, name=f"chx-mask-{uid}")


def _return_freed_memory() -> None:
    """Give memory freed by transfers back to the OS (glibc keeps it otherwise).

    Reading arrays through tiled frees buffers on several threads (the HTTP
    client's, and an embedded server's); glibc keeps the freed pages in
    per-thread arenas, so a long-lived process (a router) would carry tens
    of MB it no longer uses. ``malloc_trim`` returns them; elsewhere than
    glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _read_whole(node: Any) -> np.ndarray:
    """A stored array in one request, on this thread.

    tiled's ``read()`` builds and computes a dask graph, which costs a thread
    pool and imports dask.distributed (about 30 MB of a router's memory) to
    fetch one small array.
    """
    links = getattr(node, "item", {}).get("links", {})
    if "full" not in links:
        return np.asarray(node.read())
    structure = node.structure()
    shape = tuple(structure.shape)
    response = node.context.http_client.get(
        links["full"],
        headers={"Accept": "application/octet-stream"},
        params={"expected_shape": ",".join(map(str, shape)) or "scalar"},
    )
    response.raise_for_status()
    dtype = structure.data_type.to_numpy_dtype()
    return np.frombuffer(response.read(), dtype=dtype).reshape(shape).copy()


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


# The start of a uid as ``list`` shows it (8 characters) or longer.
_UID_PREFIX = re.compile(r"[0-9a-fA-F][0-9a-fA-F-]{7,34}")
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


def check_query(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a ``{key: value}`` metadata query (dotted keys allowed)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise MaskValidationError(
            f"metadata must be a dict of key: value to match, not {type(metadata).__name__}."
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not key.strip():
            raise MaskValidationError(f"Search keys must be non-empty strings, not {key!r}.")
        if isinstance(value, Mapping):
            raise MaskValidationError(
                f"Search value for {key!r} is a dict; a search compares single values: "
                f"reach into it with dotted keys, e.g. {{'{key}.{next(iter(value), 'name')}': "
                "...}."
            )
        if isinstance(value, (list, tuple, set, frozenset)):
            raise MaskValidationError(
                f"Search value for {key!r} is a {type(value).__name__}; a search compares "
                "single values (str, number, bool, None): search for one of them."
            )
        check_storable(value, f"the search value for {key!r}")
    try:
        json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise MaskValidationError(
            f"Search values must be JSON values (str, numbers, bool, None): {err}."
        ) from err
    return dict(metadata)


def _adoptable_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Legacy metadata as the registry stores it: nothing dropped, nothing refused.

    Keys the registry would refuse (reserved, dotted, empty) move, with their
    values, under ``legacy_metadata``.
    """
    flat: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    for key, value in metadata.items():
        if key in _LEGACY_KEYS:
            continue
        try:
            flat.update(check_metadata({key: value}))
        except MaskValidationError:
            kept[str(key)] = value
    if kept:
        flat["legacy_metadata"] = json.loads(json.dumps(kept, default=str))
    return flat


def _disk_cache_directory(choice: str | Path | None | Literal[False]) -> Path | None:
    if choice is False:
        return None
    if choice is not None:
        return Path(choice)
    from .settings import settings

    configured = settings().cache_dir
    if configured is not None:
        return configured.expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("chx-masks", appauthor=False)) / "masks"


def _local_user() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no login name (some containers): still say which machine
        user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _key_scopes(client: Any) -> frozenset[str]:
    """The scopes the server grants this client's API key (empty if it says none).

    A key made with ``inherit`` holds its principal's roles' scopes. A
    single-user server's key has a fixed set without any admin scope.
    """
    context: Any = getattr(client, "context", None)
    key = str(getattr(context, "api_key", None) or "")
    if not key:
        return frozenset()
    try:
        if not context.server_info.authentication.links:
            return frozenset()
        info = context.whoami()
    except Exception:
        return frozenset()
    info = info if isinstance(info, Mapping) else {}
    for k in info.get("api_keys") or []:
        if (
            isinstance(k, Mapping)
            and k.get("first_eight")
            and key.startswith(str(k["first_eight"]))
        ):
            scopes = set(k.get("scopes") or ())
            if "inherit" in scopes:
                scopes.discard("inherit")
                for role in info.get("roles") or []:
                    if isinstance(role, Mapping):
                        scopes.update(role.get("scopes") or ())
            return frozenset(scopes)
    return frozenset()


def _identity_of(client: Any) -> str:
    """The server's name for the caller's principal, else the local user."""
    local = _local_user()
    context = getattr(client, "context", None)
    if context is None or not getattr(context, "api_key", None):
        return local
    try:
        if not context.server_info.authentication.links:
            # A single-user server: the key has no principal to report.
            return f"{local} (single-user API key)"
        info = context.whoami()
    except Exception:
        return f"{local} (API key; the server did not say whose)"
    info = info if isinstance(info, Mapping) else {}
    identities = [i for i in info.get("identities") or [] if isinstance(i, Mapping)]
    names = [f"{i['id']} ({i.get('provider', '?')})" for i in identities if i.get("id")]
    if names:
        return names[0]
    if not info.get("uuid"):
        return f"{local} (API key; the server did not say whose)"
    # A service principal has no identity; its key's note says what it is for.
    key = str(context.api_key)
    notes = [
        k.get("note")
        for k in info.get("api_keys") or []
        if isinstance(k, Mapping)
        and k.get("first_eight")
        and k.get("note")
        and key.startswith(str(k["first_eight"]))
    ]
    return f"service principal {info['uuid']}" + (f" (key {notes[0]!r})" if notes else "")


def _active_from_metadata(md: Mapping[str, Any]) -> ActiveSet:
    return ActiveSet(
        detector=md["detector"],
        names=tuple(md["names"]),
        version=int(md["version"]),
        at=datetime.fromisoformat(md["at"]),
        note=md.get("note"),
        created_by=md.get("created_by"),
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


def _lineage_start(slots: list[_Slot]) -> int:
    start = 0
    for i, slot in enumerate(slots):
        if slot.kind == "retired":
            start = i + 1
    return start


def _select(
    detector: str,
    name: str,
    slots: list[_Slot],
    version: int | None,
    when: datetime | None,
) -> _Slot:
    """Pick the slot a look-up means; raise what a user should read otherwise."""
    if version is not None:
        for slot in slots:
            if slot.version == version:
                if slot.kind == "mask":
                    return slot
                raise MaskNotFoundError(
                    f"{detector}/{name} version {version} is the record of its "
                    f"retirement at {slot.at:%Y-%m-%d %H:%M:%S} UTC, not a mask."
                )
        versions = [s.version for s in slots if s.kind == "mask"]
        raise MaskNotFoundError(
            f"{detector}/{name} has no version {version}; versions: {versions}."
        )
    if when is not None:
        earlier = [s for s in slots if s.at <= when]
        if not earlier:
            raise MaskNotFoundError(
                f"{detector}/{name} did not exist at {when.isoformat()}: its first "
                f"version was registered at {slots[0].at.isoformat()}."
            )
        slot = earlier[-1]
        if slot.kind == "retired":
            raise MaskNotFoundError(
                f"{detector}/{name} was retired at {when.isoformat()} (since "
                f"{slot.at.isoformat()})."
            )
        return slot
    last = slots[-1]
    if last.kind == "retired":
        said = f"{detector}/{name} was retired at {last.at:%Y-%m-%d %H:%M:%S} UTC."
        raise MaskNotFoundError(
            f"{said} Its uids stay readable with get_mask_by_uid; register_mask starts it again.",
            cli=f"{said} Its uids stay readable with `chx-masks show --uid UID`; "
            f"`chx-masks register {detector} {name} FILE` starts it again.",
        )
    return last


def _detail(err: Any) -> str:
    """The server's own reason for a refusal ("Requires scopes [...]"), if any."""
    try:
        detail = err.response.json().get("detail", "")
    except Exception:
        return ""
    return detail.strip().rstrip(".") if isinstance(detail, str) else ""


class _Step:
    """One registry step on this thread: when it began, and whether a request failed."""

    __slots__ = ("began", "failed")

    def __init__(self) -> None:
        self.began = time.monotonic()
        self.failed = False


_steps = threading.local()


class _GaveUp(Exception):
    """A retry refused: the step already failed and ran past the registry's timeout.

    Not an ``httpx.HTTPError``, so tiled does not retry it in turn.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer within {seconds:g} s")
        self.seconds = seconds


class _BoundedTransport:
    """The HTTP transport of a server registry: retries stop at the registry's timeout.

    tiled retries a server that does not answer for up to its own budget
    ($TILED_RETRY_TIMEOUT, 45 s). Once a request of the current step has
    failed (no connection, no answer), each retry waits only for what is
    left of ``timeout`` since the step began, and none is made once it is
    spent, so that a call on a frozen or refusing server gives up within
    about ``timeout``. A server that answers, however slowly, is never cut
    off.
    """

    def __init__(self, inner: Any, timeout: float) -> None:
        self.inner, self.timeout = inner, timeout

    def handle_request(self, request: Any) -> Any:
        import httpx

        step = getattr(_steps, "current", None)
        if step is not None and step.failed:
            left = self.timeout - (time.monotonic() - step.began)
            if left <= 0:
                raise _GaveUp(self.timeout)
            # A retry waits only for what is left of the step's budget.
            request.extensions["timeout"] = httpx.Timeout(max(left, 0.05)).as_dict()
        try:
            return self.inner.handle_request(request)
        except (httpx.TimeoutException, httpx.NetworkError):
            if step is None:
                raise
            step.failed = True
            if time.monotonic() - step.began >= self.timeout:
                # No retry could answer in time: skip tiled's back-off before it.
                raise _GaveUp(self.timeout) from None
            raise

    def close(self) -> None:
        self.inner.close()


def _bound_retries(context: Any, timeout: float) -> None:
    """Put :class:`_BoundedTransport` under tiled's caching transport of ``context``."""
    outer: Any = getattr(context.http_client, "_transport", None)
    inner = getattr(outer, "transport", None)
    if inner is not None and hasattr(inner, "handle_request"):
        outer.transport = _BoundedTransport(inner, timeout)


@contextmanager
def _translate(action: str, location: str) -> Iterator[None]:
    """Turn transport and authorization failures into registry errors."""
    import httpx

    outermost = getattr(_steps, "current", None) is None
    if outermost:
        _steps.current = _Step()
    try:
        yield
    except ChxMasksError:
        raise
    except _GaveUp as err:
        raise RegistryUnavailableError(
            f"Cannot reach the mask registry at {location} while {action} (no answer "
            f"within {err.seconds:g} s). Check that the tiled server at {location} is "
            "running and reachable."
        ) from None
    except httpx.HTTPStatusError as err:
        code = _status(err)
        if code in (401, 403):
            detail = _detail(err)
            raise MaskPermissionError(
                f"The registry at {location} refused {action} (HTTP {code}"
                f"{': ' + detail if detail else ''}): the credentials in use do not "
                "allow it. Use an API key with the needed scopes (read:metadata, "
                "read:data to read; write:metadata, write:data, create:node to "
                "write), e.g. through CHX_MASKS_API_KEY."
            ) from None
        raise
    except (httpx.TransportError, OSError) as err:
        raise RegistryUnavailableError(
            f"Cannot reach the mask registry at {location} while {action} "
            f"({type(err).__name__}). Check that the tiled server at {location} is "
            "running and reachable."
        ) from err
    finally:
        if outermost:
            _steps.current = None
