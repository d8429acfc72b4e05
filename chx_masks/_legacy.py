"""Legacy adoption: masks of the older flat CHX layout brought into the registry.

The part of :class:`~chx_masks.MaskRegistry` behind ``adopt_legacy`` (and
``chx-masks adopt``); reads use :func:`_legacy_record` for legacy uids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ._content import check_metadata, check_name, coerce_mask, mask_sha256, utcnow
from ._errors import MaskValidationError
from ._lineage import _Lineages
from ._records import DetectorRecord, MaskRecord
from ._store import (
    _LEGACY_KEYS,
    LEGACY_SPEC,
    MASKS,
    SCHEMA_VERSION,
    _Slot,
    _Stored,
    create_or_conflict,
    logger,
)


class _Legacy(_Lineages):
    """Adopting legacy masks: each keeps its uid and version, gains a sha256 and a slot."""

    if TYPE_CHECKING:
        # Reads (chx_masks._reads), which the registry has too.
        def describe(self, uid: str) -> MaskRecord: ...

        def _read(self, uid: str) -> np.ndarray: ...

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
                adopted.append(_legacy_record(stored))
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
        action = f"adopting legacy mask {stored.uid}"
        if not create_or_conflict(
            action, self.location, self._store_mask, masks, stored.uid, array, stored_md, action
        ):
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


def _legacy_record(stored: _Stored) -> MaskRecord:
    """The record of a legacy mask not adopted yet (no slot, so no times)."""
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
