"""Active sets: which masks apply to each detector, with their history.

The part of :class:`~chx_masks.MaskRegistry` behind ``activate`` and the
other active-set methods; run starts read it through them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from ._content import TimeLike, check_name, check_storable, to_datetime, utcnow
from ._errors import ChxMasksError, MaskValidationError
from ._lineage import _starts_after
from ._reads import _Reads
from ._records import ActiveSet
from ._store import _MAX_CLAIM_ATTEMPTS, _PAGE, ACTIVE, ACTIVE_SPEC, create_or_conflict

# The role classes' doctests use the registry by its public name; set by
# chx_masks._registry once the class exists.
MaskRegistry: type


class _ActiveSets(_Reads):
    """A detector's active sets: ``active/<detector>/<version>``, each from ``at`` on."""

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
            create_or_conflict(
                f"recording the active set of {detector}",
                self.location,
                container.create_container,
                key=detector,
                metadata={"detector": detector},
            )
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
        from tiled.structures.core import Spec

        for _ in range(_MAX_CLAIM_ATTEMPTS):
            last = self.active_set(detector)
            version = last.version + 1 if last else 0
            at = _starts_after(last.at if last else None, utcnow())
            md = {
                "detector": detector,
                "version": version,
                "names": list(names),
                "note": note,
                "at": at.isoformat(),
                "created_by": self.identity,
            }
            if not create_or_conflict(
                f"recording the active set of {detector}",
                self.location,
                node.create_container,
                key=str(version),
                metadata=md,
                specs=[Spec(ACTIVE_SPEC)],
            ):
                continue
            self._record_change(detector, f"{ACTIVE}/{version}")
            return _active_from_metadata(md)
        raise ChxMasksError(
            f"Gave up recording the active set of {detector} after "
            f"{_MAX_CLAIM_ATTEMPTS} attempts: other writers kept changing it. Try again."
        )


def _active_from_metadata(md: Mapping[str, Any]) -> ActiveSet:
    return ActiveSet(
        detector=md["detector"],
        names=tuple(md["names"]),
        version=int(md["version"]),
        at=datetime.fromisoformat(md["at"]),
        note=md.get("note"),
        created_by=md.get("created_by"),
    )
