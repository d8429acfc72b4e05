"""Two versions of one mask side by side: the pixels newly masked and newly kept.

Used by :meth:`chx_masks.MaskRegistry.diff` and ``chx-masks diff``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._errors import MaskNotFoundError

if TYPE_CHECKING:
    from ._records import MaskRecord
    from ._registry import MaskRegistry

NEWLY_MASKED_COLOR = "#dc143c"  # crimson, as masked pixels everywhere
NEWLY_KEPT_COLOR = "#1f77b4"  # blue
BOTH_MASKED_COLOR = "#8c8c96"  # grey: masked before and after


@dataclass(frozen=True, eq=False)
class MaskDiff:
    """What changed between two versions of a mask (True = pixel kept in both arrays).

    Examples
    --------
    >>> old = np.ones((2, 3), bool); old[0, 0] = False
    >>> new = np.ones((2, 3), bool); new[1, :] = False
    >>> d = MaskDiff(None, None, old, new)
    >>> d.newly_masked_pixels, d.newly_kept_pixels, d.masked_in_both_pixels
    (3, 1, 0)
    """

    old: MaskRecord | None
    new: MaskRecord | None
    old_mask: np.ndarray
    new_mask: np.ndarray

    @cached_property
    def newly_masked(self) -> np.ndarray:
        """Pixels the old version kept and the new one masks."""
        return self.old_mask & ~self.new_mask

    @cached_property
    def newly_kept(self) -> np.ndarray:
        """Pixels the old version masked and the new one keeps."""
        return ~self.old_mask & self.new_mask

    @property
    def newly_masked_pixels(self) -> int:
        return int(np.count_nonzero(self.newly_masked))

    @property
    def newly_kept_pixels(self) -> int:
        return int(np.count_nonzero(self.newly_kept))

    @property
    def masked_in_both_pixels(self) -> int:
        return int(np.count_nonzero(~self.old_mask & ~self.new_mask))


def versions_to_compare(
    registry: MaskRegistry, detector: str, name: str, old: int | None, new: int | None
) -> tuple[MaskRecord, MaskRecord]:
    """The records of versions ``old`` and ``new`` (default: the last two)."""
    records = {r.version: r for r in registry.history(detector, name)}
    held = sorted(v for v in records if v is not None)
    if old is None and new is None:
        if len(held) < 2:
            raise MaskNotFoundError(
                f"{detector}/{name} has one version only (v{held[0]}): nothing to compare."
            )
        old, new = held[-2], held[-1]
    elif new is None:
        new = held[-1]
    missing = [v for v in (old, new) if v not in records]
    if missing:
        shown = ", ".join(f"v{v}" for v in held)
        raise MaskNotFoundError(
            f"{detector}/{name} has no version {missing[0]} (it has {shown}; "
            "a retirement is not a version)."
        )
    return records[old], records[new]


def diff_png(diff: MaskDiff, path: str | PathLike[str], *, title: str) -> Path:
    """Write a picture of a diff: newly masked crimson, newly kept blue, masked in both grey.

    Reduced by blocks as the other pictures are; in a block, newly masked
    wins over newly kept, which wins over masked in both, so single changed
    pixels stay visible.

    Examples
    --------
    >>> import os, tempfile
    >>> old = np.ones((514, 1030), bool)
    >>> new = old.copy(); new[100:120, 200:260] = False
    >>> out = diff_png(MaskDiff(None, None, old, new),
    ...                os.path.join(tempfile.mkdtemp(), "d.png"), title="v0 -> v1")
    >>> out.name
    'd.png'
    """
    from ._plot import (
        KEPT_COLOR,
        _block_max,
        _figure,
        _layout,
        _legend,
        _percent,
        _rgb,
        _save,
        _show,
    )

    rows, cols = diff.new_mask.shape
    codes = np.zeros((rows, cols), np.uint8)
    codes[~diff.old_mask & ~diff.new_mask] = 1
    codes[diff.newly_kept] = 2
    codes[diff.newly_masked] = 3
    total = codes.size
    fig, ax = _figure((rows, cols), title)
    _legend(
        fig,
        [
            (
                NEWLY_MASKED_COLOR,
                f"newly masked: {diff.newly_masked_pixels:,} px "
                f"({_percent(diff.newly_masked_pixels, total)})",
            ),
            (
                NEWLY_KEPT_COLOR,
                f"newly kept: {diff.newly_kept_pixels:,} px "
                f"({_percent(diff.newly_kept_pixels, total)})",
            ),
            (BOTH_MASKED_COLOR, f"masked in both: {diff.masked_in_both_pixels:,} px"),
        ],
    )
    factor = _layout(fig, ax, (rows, cols))
    lut = np.stack(
        [_rgb(c) for c in (KEPT_COLOR, BOTH_MASKED_COLOR, NEWLY_KEPT_COLOR, NEWLY_MASKED_COLOR)]
    )
    _show(ax, lut[_block_max(codes, factor)], factor)
    return _save(fig, path)
