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

:class:`MaskRegistry` is assembled from one class per role, each in its own
module: ``_store`` (the layout above, nodes, detectors, the change log),
``_lineage`` (slots: claims and which version a look-up means), ``_reads``,
``_active``, ``_search`` and ``_legacy``; ``_arrays`` holds the arrays read
and ``_connection`` talks to the server. This module keeps construction and
the writes.
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from . import _active, _reads, _search, _store
from ._active import _ActiveSets
from ._arrays import _Arrays, _disk_cache_directory
from ._connection import _connect, _key_scopes, _local_user, _split_api_key, _translate, redact
from ._connection import _status as _status
from ._content import ADMIN_SCOPE, check_metadata, check_name, coerce_mask, mask_sha256
from ._diff import MaskDiff, versions_to_compare
from ._errors import (
    MaskExistsError,
    MaskIntegrityError,
    MaskInUseError,
    MaskNotFoundError,
    MaskPermissionError,
    MaskPurgedError,
    MaskValidationError,
    RegistryUnavailableError,
)
from ._legacy import _Legacy
from ._lineage import _refuse_active, _refuse_inactive
from ._records import MaskRecord
from ._search import _Search
from ._search import check_query as check_query
from ._store import ACTIVE as ACTIVE
from ._store import ACTIVE_SPEC as ACTIVE_SPEC
from ._store import CHANGE_SPEC as CHANGE_SPEC
from ._store import CHANGES as CHANGES
from ._store import DETECTORS as DETECTORS
from ._store import LEGACY_SPEC as LEGACY_SPEC
from ._store import MASK_SPEC as MASK_SPEC
from ._store import MASKS, logger
from ._store import SCHEMA_VERSION as SCHEMA_VERSION
from ._store import SLOT_SPEC as SLOT_SPEC
from ._store import _Slot as _Slot
from ._store import _Stored as _Stored

# Besides MaskRegistry, the names re-exported above (``x as x``) are imported
# from here by chx_masks.stores, _verify, _local, the tests and benchmarks.
__all__ = ["MaskRegistry"]


class MaskRegistry(_ActiveSets, _Search, _Legacy):
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
        self.location = location or redact(str(getattr(client, "uri", "tiled")))
        self._owned = []
        self._lock = threading.RLock()
        self._nodes = {}
        # Records checked against the slot that claims them, and records read
        # (in one query for several) but not checked yet.
        self._stored = {}
        self._unchecked = {}
        self._arrays = _Arrays(self, self._lock, cache_bytes, _disk_cache_directory(disk_cache))
        self._identity = None
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
        uri, api_key = _split_api_key(uri, api_key)
        location = redact(uri)
        client = _connect(uri, api_key, timeout, location)
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
        _refuse_active(detector, name, slots)
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
        _refuse_inactive(detector, name, slots)
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
        _refuse_inactive(detector, name, slots)
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
            check=functools.partial(_refuse_inactive, detector, name),
        )
        return self._record_at(slots, len(slots) - 2)

    def diff(
        self, detector: str, name: str, old: int | None = None, new: int | None = None
    ) -> MaskDiff:
        """Two versions of ``(detector, name)`` side by side (default: the last two).

        With only ``old`` given, it is compared with the latest version.

        Examples
        --------
        >>> import numpy as np, tempfile
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     m = np.ones((514, 1030), bool)
        ...     _ = reg.register_mask("eiger500K_single_image", "beamstop", m)
        ...     m[10:20, 10:20] = False
        ...     _ = reg.update_mask("eiger500K_single_image", "beamstop", m)
        ...     d = reg.diff("eiger500K_single_image", "beamstop")
        ...     (d.old.version, d.new.version, d.newly_masked_pixels, d.newly_kept_pixels)
        (0, 1, 100, 0)
        """
        before, after = versions_to_compare(self, detector, name, old, new)
        return MaskDiff(before, after, self._read(before.uid), self._read(after.uid))

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
            self._nodes.pop(f"uid:{uid}", None)
        self._arrays.forget(uid)
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


# The role classes' doctests run in their own modules and use the registry by
# its public name, as its users do.
_active.MaskRegistry = MaskRegistry
_reads.MaskRegistry = MaskRegistry
_search.MaskRegistry = MaskRegistry
_store.MaskRegistry = MaskRegistry
