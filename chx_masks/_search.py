"""Search: masks found by detector, name and metadata values.

The part of :class:`~chx_masks.MaskRegistry` behind ``search`` (and
``chx-masks search``); :func:`check_query` validates a query before it is sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._content import check_name, check_storable
from ._errors import MaskValidationError
from ._reads import _Reads
from ._records import MaskRecord
from ._store import MASKS, _metadata_view

# The role classes' doctests use the registry by its public name; set by
# chx_masks._registry once the class exists.
MaskRegistry: type


class _Search(_Reads):
    """Equality search over what each mask's node says of itself."""

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
