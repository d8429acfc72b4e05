"""Frozen value objects the registry returns: detectors, mask versions, composites.

Produced by :class:`chx_masks.MaskRegistry`; read by users, the CLI and the
Bluesky integration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, overload

import numpy as np

from ._content import shape_str


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class DetectorRecord:
    """A detector the registry knows: its image data key and frame shape.

    Examples
    --------
    >>> DetectorRecord("eiger1m_single_image", (1065, 1030)).pixels
    1096950
    """

    name: str
    shape: tuple[int, int]
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    builtin: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "metadata", _frozen_mapping(self.metadata))

    @property
    def pixels(self) -> int:
        """Number of pixels in one frame."""
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class MaskRecord:
    """One immutable version of a mask, as ``describe(uid)`` reports it.

    ``registered_at <= t < (superseded_at or retired_at)`` is the half-open
    interval during which this version answered name look-ups.

    Examples
    --------
    >>> from datetime import datetime, timezone
    >>> r = MaskRecord(uid="u", detector="d", name="n", version=0,
    ...                registered_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
    ...                superseded_at=None, retired_at=None, sha256="0" * 64,
    ...                shape=(2, 2), masked_pixels=1, metadata={})
    >>> r.active, r.masked_fraction
    (True, 0.25)
    """

    uid: str
    detector: str
    name: str
    version: int | None
    registered_at: datetime | None
    superseded_at: datetime | None
    retired_at: datetime | None
    sha256: str
    shape: tuple[int, int]
    masked_pixels: int
    metadata: Mapping[str, Any] = field(compare=False, hash=False)
    legacy: bool = False
    #: Who registered this version: the API key's principal on a tiled
    #: server, else the operating-system user (``user@host``); None for
    #: versions registered before this was recorded.
    created_by: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "metadata", _frozen_mapping(self.metadata))

    @property
    def active(self) -> bool:
        """True while this version is what a name look-up returns."""
        return self.superseded_at is None and self.retired_at is None

    @property
    def valid_until(self) -> datetime | None:
        """End of the validity interval (exclusive), or None if still active."""
        return self.superseded_at or self.retired_at

    @property
    def masked_fraction(self) -> float:
        """Fraction of the detector's pixels this mask removes."""
        return self.masked_pixels / float(np.prod(self.shape))

    def valid_at(self, when: datetime) -> bool:
        """Whether this version was the active one at ``when``."""
        if self.registered_at is None or when < self.registered_at:
            return False
        end = self.valid_until
        return end is None or when < end

    def __str__(self) -> str:
        state = (
            "active"
            if self.active
            else (
                f"retired {self.retired_at:%Y-%m-%d %H:%M}"
                if self.retired_at
                else f"superseded {self.superseded_at:%Y-%m-%d %H:%M}"
            )
        )
        return (
            f"{self.detector}/{self.name} v{self.version} {self.uid} "
            f"{shape_str(self.shape)} masked {self.masked_fraction:.3%} ({state})"
        )


@dataclass(frozen=True)
class ComponentExplanation:
    """What one component contributes to a composite mask."""

    name: str
    uid: str
    version: int | None
    masked_pixels: int
    only_masked_pixels: int


@dataclass(frozen=True)
class Explanation:
    """Per-component account of a composite mask; ``str()`` gives a table."""

    detector: str
    total_pixels: int
    masked_pixels: int
    components: tuple[ComponentExplanation, ...]

    def __str__(self) -> str:
        width = max([len("component")] + [len(c.name) for c in self.components])
        lines = [
            f"{self.detector}: {self.masked_pixels:,} of {self.total_pixels:,} "
            f"pixels masked ({self.masked_pixels / self.total_pixels:.3%})",
            f"{'component':<{width}}  {'version':>7}  {'masks':>12}  {'only it':>12}",
        ]
        for c in self.components:
            lines.append(
                f"{c.name:<{width}}  {c.version!s:>7}  {c.masked_pixels:>12,}  "
                f"{c.only_masked_pixels:>12,}"
            )
        return "\n".join(lines)


class PackedMasks(Sequence[np.ndarray]):
    """Bool masks kept as packed bits (an eighth of their size), unpacked on access.

    Each item is a new read-only bool array equal to the mask given.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.ones((3, 5), bool); a[1, 2] = False
    >>> packed = PackedMasks([a, ~a])
    >>> len(packed), bool((packed[0] == a).all()), int((~packed[1]).sum())
    (2, True, 14)
    """

    __slots__ = ("_packed", "_shapes")

    def __init__(self, masks: Iterable[np.ndarray]) -> None:
        masks = list(masks)
        self._shapes = tuple(m.shape for m in masks)
        self._packed = tuple(np.packbits(np.asarray(m, dtype=bool), axis=None) for m in masks)

    @classmethod
    def concat(cls, parts: Iterable[PackedMasks]) -> PackedMasks:
        """One sequence of the masks of several, without unpacking them."""
        joined = cls([])
        parts = list(parts)
        joined._packed = tuple(p for part in parts for p in part._packed)
        joined._shapes = tuple(s for part in parts for s in part._shapes)
        return joined

    def __len__(self) -> int:
        return len(self._packed)

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[np.ndarray, ...]: ...

    def __getitem__(self, i: int | slice) -> np.ndarray | tuple[np.ndarray, ...]:
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        shape = self._shapes[i]
        count = int(np.prod(shape, dtype=np.int64))
        array = np.unpackbits(self._packed[i], count=count).view(np.bool_).reshape(shape)
        array.flags.writeable = False
        return array

    @property
    def nbytes(self) -> int:
        """Bytes held (the packed bits)."""
        return sum(p.nbytes for p in self._packed)


@dataclass(frozen=True)
class CompositeMask:
    """The AND of several masks, with the exact versions that made it.

    ``mask`` is a read-only NumPy array (True = pixel kept); ``sha256`` is the
    content hash of that composite array.
    """

    detector: str
    names: tuple[str, ...]
    uids: tuple[str, ...]
    versions: tuple[int | None, ...]
    sha256: str
    mask: np.ndarray = field(repr=False, compare=False, hash=False)
    components: Sequence[np.ndarray] = field(repr=False, compare=False, hash=False)
    as_of: datetime | None = None

    def check_frames(self, frame_shape: Sequence[int], what: str = "frames") -> None:
        """Raise FrameShapeError unless frames of ``frame_shape`` fit this mask.

        The last two axes of ``frame_shape`` are a frame's (rows, cols); any
        axes before them (frames, events) are not compared.

        Examples
        --------
        >>> import numpy as np
        >>> m = np.ones((2, 3), bool)
        >>> c = CompositeMask("d", ("a",), ("ua",), (0,), "h", mask=m, components=(m,))
        >>> c.check_frames((10, 2, 3))
        >>> c.check_frames((3, 2))
        Traceback (most recent call last):
        ...
        chx_masks._errors.FrameShapeError: frames are 3x2 but the mask of d is 2x3: ...
        """
        from ._errors import FrameShapeError

        shape = tuple(int(n) for n in frame_shape)[-2:]
        if shape != tuple(self.mask.shape):
            raise FrameShapeError(
                f"{what} are {shape_str(shape)} but the mask of {self.detector} is "
                f"{shape_str(self.mask.shape)}: it belongs to a detector of another shape. "
                "Use the masks of the detector that took these frames."
            )

    def explain(self) -> Explanation:
        """Pixels each component masks, and pixels only it masks.

        Examples
        --------
        >>> import numpy as np
        >>> a = np.ones((2, 2), bool); a[0, 0] = False
        >>> b = np.ones((2, 2), bool); b[0, 0] = b[1, 1] = False
        >>> c = CompositeMask("d", ("a", "b"), ("ua", "ub"), (0, 0), "h",
        ...                   mask=a & b, components=(a, b))
        >>> [(x.name, x.masked_pixels, x.only_masked_pixels)
        ...  for x in c.explain().components]
        [('a', 1, 0), ('b', 2, 1)]
        """
        masked = [~m for m in self.components]
        count = np.zeros(self.mask.shape, dtype=np.uint16)
        for m in masked:
            count += m
        rows = tuple(
            ComponentExplanation(
                name=name,
                uid=uid,
                version=version,
                masked_pixels=int(m.sum()),
                only_masked_pixels=int((m & (count == 1)).sum()),
            )
            for name, uid, version, m in zip(
                self.names, self.uids, self.versions, masked, strict=True
            )
        )
        return Explanation(
            detector=self.detector,
            total_pixels=int(self.mask.size),
            masked_pixels=int((~self.mask).sum()),
            components=rows,
        )

    def provenance(self) -> dict[str, Any]:
        """The record a run's start document carries for this detector.

        Examples
        --------
        >>> import numpy as np
        >>> m = np.ones((1, 1), bool)
        >>> CompositeMask("d", ("a",), ("u",), (3,), "h", mask=m,
        ...               components=(m,)).provenance()
        {'names': ['a'], 'uids': ['u'], 'versions': [3], 'sha256': 'h'}
        """
        return {
            "names": list(self.names),
            "uids": list(self.uids),
            "versions": list(self.versions),
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class ActiveSet:
    """Which masks apply to a detector from ``at`` on: one version of its choice.

    Staff change it between samples (``MaskRegistry.activate``); the Bluesky
    preprocessor reads the current one at every run start. An empty ``names``
    means the registry makes no choice for the detector.

    Examples
    --------
    >>> from datetime import datetime, timezone
    >>> s = ActiveSet("eiger4m_single_image", ("gaps", "beamstop"), 2,
    ...               datetime(2026, 11, 25, 9, 30, tzinfo=timezone.utc), note="sample B")
    >>> str(s)
    'eiger4m_single_image: gaps, beamstop (active set v2, 2026-11-25 09:30 UTC, sample B)'
    """

    detector: str
    names: tuple[str, ...]
    version: int
    at: datetime
    note: str | None = None
    #: Who made this choice (as ``MaskRecord.created_by``); None if unrecorded.
    created_by: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))

    def __str__(self) -> str:
        names = ", ".join(self.names) if self.names else "(none)"
        note = f", {self.note}" if self.note else ""
        return (
            f"{self.detector}: {names} (active set v{self.version}, "
            f"{self.at:%Y-%m-%d %H:%M} UTC{note})"
        )
