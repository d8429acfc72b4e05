"""Lineages: claiming a (detector, name)'s next slot, and which slot a look-up means.

The choices are pure functions of a lineage's slots (tested without tiled in
tests/test_lineage.py); :class:`_Lineages` is the part of
:class:`~chx_masks.MaskRegistry` that reads slots and claims them in tiled.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import numpy as np

from ._content import SEALED, check_name, mask_sha256, record_sha256, utcnow
from ._errors import ChxMasksError, MaskExistsError, MaskNotFoundError, MaskValidationError
from ._records import DetectorRecord, MaskRecord
from ._store import (
    _MAX_CLAIM_ATTEMPTS,
    _TICK,
    MASK_SPEC,
    MASKS,
    SCHEMA_VERSION,
    SLOT_SPEC,
    _Slot,
    _Store,
    _Stored,
    create_or_conflict,
    logger,
)

# ---------------------------------------------------------- pure functions


def _slot_from_metadata(key: str, md: Mapping[str, Any]) -> _Slot | None:
    """The slot a node keyed ``key`` records, or None if the registry did not write it.

    A slot's key is its claim (``name@version``): a node whose key says
    otherwise is not a slot.
    """
    if key != f"{md.get('name')}@{md.get('version')}":
        return None
    return _Slot(
        md["name"],
        int(md["version"]),
        md["kind"],
        md.get("uid"),
        datetime.fromisoformat(md["at"]),
        md.get("created_by"),
        md.get("record_sha256"),
    )


def _starts_after(previous: datetime | None, now: datetime) -> datetime:
    """When a new version starts: now, but never before the one it follows.

    Validity intervals must not run backwards even when writers' clocks
    disagree: each version starts after the one before.
    """
    return max(now, previous + _TICK) if previous is not None else now


def _next_claim(slots: Sequence[_Slot], exact: int | None, now: datetime) -> tuple[int, datetime]:
    """The version (``exact`` if given) and start of the slot claimed after ``slots``."""
    last = slots[-1] if slots else None
    version = exact if exact is not None else (last.version + 1 if last else 0)
    return version, _starts_after(last.at if last else None, now)


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


def _validity(slots: Sequence[_Slot], i: int) -> tuple[datetime | None, datetime | None]:
    """When version ``i`` of a lineage was superseded and when retired (None: not yet)."""
    following = slots[i + 1] if i + 1 < len(slots) else None
    retired_at = superseded_at = None
    if following is not None:
        if following.kind == "retired":
            retired_at = following.at
        else:
            superseded_at = following.at
    return superseded_at, retired_at


def _version_record(
    slots: Sequence[_Slot],
    i: int,
    stored: _Stored | None,
    purged: Mapping[str, Any] | None = None,
) -> MaskRecord:
    """The record of version ``i``: from its stored mask, or from the log of its purge."""
    slot = slots[i]
    assert slot.uid is not None
    superseded_at, retired_at = _validity(slots, i)
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


def _lookup_names(names: Sequence[str], version: int | None, as_of: object) -> list[str]:
    """The names of a look-up, checked, with its ``version`` or ``as_of``."""
    if isinstance(names, str):
        raise MaskValidationError(
            f"names must be a list of mask names, not the string {names!r}; write [{names!r}]."
        )
    if not isinstance(names, Iterable):
        raise MaskValidationError(
            f"names must be a list of mask names, not {type(names).__name__}."
        )
    checked = [check_name(n) for n in names]
    if not checked:
        raise MaskValidationError("Give at least one mask name.")
    duplicates = sorted({n for n in checked if checked.count(n) > 1})
    if duplicates:
        raise MaskValidationError(f"Mask names repeat: {duplicates}; give each once.")
    if version is not None and as_of is not None:
        raise MaskValidationError("Give version= or as_of=, not both.")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, (int, np.integer))
    ):
        raise MaskValidationError(f"version must be an integer, not {version!r}.")
    return checked


def _refuse_active(detector: str, name: str, slots: list[_Slot]) -> None:
    """Refuse to start a lineage that is active (its last slot is a mask)."""
    if slots and slots[-1].kind == "mask":
        last = slots[-1]
        said = f"{detector}/{name} is already registered (version {last.version}, uid {last.uid})."
        raise MaskExistsError(
            f"{said} Use update_mask({detector!r}, {name!r}, mask) to add a version, "
            "or delete_mask first to retire it.",
            cli=f"{said} Use `chx-masks update {detector} {name} FILE` to add a "
            f"version, or `chx-masks delete {detector} {name}` first to retire it.",
        )


def _refuse_inactive(detector: str, name: str, slots: list[_Slot]) -> None:
    """Refuse to change a lineage that was never started or was retired."""
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


# ------------------------------------------------------------------ in tiled


class _Lineages(_Store):
    """Reading a detector's slots and claiming new ones (the steps of a write)."""

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
                slot = _slot_from_metadata(key, child.metadata)
                if slot is None:
                    logger.warning(
                        "Ignoring %s/%s: its key does not match its name and version.",
                        detector,
                        key,
                    )
                    continue
                found.setdefault(slot.name, []).append(slot)
        for slots in found.values():
            slots.sort(key=lambda s: s.version)
        return found

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
        refuse = _refuse_active if action == "register" else _refuse_inactive
        check = functools.partial(refuse, record.name, name)
        self._store_mask(masks, uid, array, stored_md, f"writing mask {record.name}/{name}")
        self._claim_and_seal(node, masks, record.name, name, slots, uid, stored_md, check)
        self._arrays.remember(uid, array)
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
        check: Callable[[list[_Slot]], None],
        version: int | None = None,
        record: str | None = None,
    ) -> list[_Slot]:
        """Claim the next slot (or exactly ``version``); return the slots after it.

        ``record`` is the hash of the claimed mask node's metadata
        (:func:`record_sha256`), kept in the slot so that reads can check it.
        """
        from tiled.structures.core import Spec

        exact = version
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            check(slots)
            version, at = _next_claim(slots, exact, utcnow())
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
            if not create_or_conflict(
                f"recording {detector}/{name} v{version}",
                self.location,
                node.create_container,
                key=f"{name}@{version}",
                metadata=slot_md,
                specs=[Spec(SLOT_SPEC)],
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
