"""Reads: masks by name, version, time or uid, their records and composites.

The part of :class:`~chx_masks.MaskRegistry` that answers look-ups; every
other role reads through it.
"""

from __future__ import annotations

import functools
import operator
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from ._content import TimeLike, check_name, to_datetime
from ._errors import (
    MaskIntegrityError,
    MaskNotFoundError,
    MaskPurgedError,
    MaskValidationError,
)
from ._legacy import _legacy_record
from ._lineage import _lineage_start, _Lineages, _lookup_names, _select, _version_record
from ._records import CompositeMask, MaskRecord
from ._store import CHANGES, DETECTORS, LEGACY_SPEC, MASKS, _metadata_view, _Slot, _Stored

if TYPE_CHECKING:
    import dask.array

# The start of a uid as ``list`` shows it (8 characters) or longer.
_UID_PREFIX = re.compile(r"[0-9a-fA-F][0-9a-fA-F-]{7,34}")

# The role classes' doctests use the registry by its public name; set by
# chx_masks._registry once the class exists.
MaskRegistry: type


class _Reads(_Lineages):
    """Look-ups by name (current, ``version=``, ``as_of=``) and by uid."""

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
        return self._arrays.lazy(slot.mask_uid)

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
        return self._arrays.lazy(self._stored_for(uid).uid)

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
        arrays = [self._arrays.lazy(s.mask_uid) for s in slots]
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
        composite, digest, components = self._arrays.composite(uids)
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
        composite, digest, components = self._arrays.composite(key)
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
            return _legacy_record(stored)
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

    # --------------------------------------------------------------- internals

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
        names = _lookup_names(names, version, as_of)
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
        return _version_record(slots, i, stored, purged)

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

    def _read(self, uid: str) -> np.ndarray:
        """A verified, read-only NumPy array of a uid (see ``_Arrays.read``)."""
        return self._arrays.read(uid)
