"""Eiger geometry and the checks, fingerprints and pixel arithmetic behind the generators.

Private to :mod:`chx_masks.generate`, which re-exports the geometry constants.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._detectors import BUILTIN_DETECTORS
from ._errors import MaskValidationError
from ._version import __version__

#: CHX image data key -> pyFAI detector name (as ``detector_factory`` accepts it).
PYFAI_DETECTORS: Mapping[str, str] = {
    "eiger4m_single_image": "Eiger4M",
    "eiger1m_single_image": "Eiger1M",
    "eiger500K_single_image": "Eiger500k",
}

MODULE_SHAPE = (514, 1030)
MODULE_GAP = (37, 10)
CHIP_SIZE = 256
#: Interpolated (double-size) pixels between two chips, per boundary.
CHIP_BOUNDARY = 2
CHIPS_PER_MODULE = (2, 4)


def _source(
    generator: str, parameters: dict[str, Any], libraries: Mapping[str, str] | None = None
) -> dict[str, Any]:
    libs = {"numpy": np.__version__, **(libraries or {})}
    source = {
        "kind": "generator",
        "generator": generator,
        "parameters": parameters,
        "libraries": libs,
        "chx_masks": __version__,
    }
    # Fail here, where the generator is known, rather than in the registry.
    json.dumps(source, allow_nan=False)
    return source


def _known_detector(detector: Any) -> str:
    if detector not in PYFAI_DETECTORS:
        raise MaskValidationError(
            f"No Eiger geometry known for detector {detector!r}; known detectors: "
            f"{', '.join(sorted(PYFAI_DETECTORS))}."
        )
    return detector


def _check_shape(shape: Any) -> tuple[int, int]:
    try:
        values = tuple(shape)
    except TypeError as err:
        raise MaskValidationError(
            f"shape must be (rows, cols), two positive ints; got {shape!r}."
        ) from err
    if len(values) != 2 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise MaskValidationError(f"shape must be (rows, cols), two positive ints; got {shape!r}.")
    return int(values[0]), int(values[1])


def _check_point(point: Any, what: str) -> tuple[float, float]:
    try:
        values = tuple(float(v) for v in point)
    except (TypeError, ValueError) as err:
        raise MaskValidationError(
            f"{what} must be (row, col), two finite numbers; got {point!r}."
        ) from err
    if len(values) != 2 or not all(math.isfinite(v) for v in values):
        raise MaskValidationError(f"{what} must be (row, col), two finite numbers; got {point!r}.")
    return values


def _check_count(value: Any, what: str, *, minimum: int, maximum: int | None = None) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise MaskValidationError(f"{what} must be an int; got {value!r}.")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise MaskValidationError(f"{what} must be at least {minimum}{upper}; got {value}.")
    return int(value)


def _refuse_empty(inside: np.ndarray, what: str) -> None:
    # A beamstop shape that covers no pixel almost always means swapped
    # (row, col) or coordinates of another detector; say so instead of
    # registering an all-True mask.
    if not inside.any():
        raise MaskValidationError(
            f"The {what} covers no pixel centre of the {inside.shape[0]}x"
            f"{inside.shape[1]} image; check the coordinates are (row, col) pixels."
        )


def _array_sha256(array: np.ndarray) -> str:
    """sha256 over dtype, shape and the C-order bytes of ``array``."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256()
    h.update(a.dtype.str.encode())
    h.update(repr(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _module_grid(detector: str) -> tuple[int, int]:
    rows, cols = BUILTIN_DETECTORS[detector].shape
    n_rows, rest_r = divmod(rows + MODULE_GAP[0], MODULE_SHAPE[0] + MODULE_GAP[0])
    n_cols, rest_c = divmod(cols + MODULE_GAP[1], MODULE_SHAPE[1] + MODULE_GAP[1])
    if rest_r or rest_c:
        raise MaskValidationError(
            f"{detector!r} ({rows}x{cols}) is not a whole number of "
            f"{MODULE_SHAPE[0]}x{MODULE_SHAPE[1]} Eiger modules with "
            f"{MODULE_GAP[0]}x{MODULE_GAP[1]} gaps."
        )
    return n_rows, n_cols


def _chip_boundary_lines(n_chips: int, width: int) -> np.ndarray:
    """Indices (within one module) masked around each internal chip boundary."""
    pitch = CHIP_SIZE + CHIP_BOUNDARY
    lines: list[int] = []
    for i in range(1, n_chips):
        # The boundary lies between the two interpolated pixels at
        # i*pitch-2 and i*pitch-1; take `width` pixels on each side of it.
        centre = i * pitch - 1
        lines.extend(range(centre - width, centre + width))
    return np.asarray(lines, dtype=int)


def _check_stack(stack: Any, what: str) -> np.ndarray:
    array = np.asarray(stack)
    if array.ndim != 3:
        raise MaskValidationError(
            f"{what} must be a 3-D stack (frames, rows, cols); got {array.ndim}-D with "
            f"shape {array.shape}. Wrap a single frame as frame[None]."
        )
    if array.shape[0] == 0 or array.shape[1] == 0 or array.shape[2] == 0:
        raise MaskValidationError(f"{what} is empty: shape {array.shape}.")
    if array.dtype.kind not in "uif" or array.dtype == np.bool_:
        raise MaskValidationError(f"{what} must hold counts (ints or floats), not {array.dtype}.")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise MaskValidationError(
            f"{what} holds {int((~np.isfinite(array)).sum())} NaN/inf values; "
            "replace them (e.g. with a large count) so they are judged, not skipped."
        )
    return array


def _check_threshold(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise MaskValidationError(f"{what} must be a number; got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise MaskValidationError(f"{what} must be finite and >= 0; got {value}.")
    return value


def _even_odd_inside(pts: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Which pixel centres of a ``rows`` x ``cols`` image lie inside polygon ``pts`` (even-odd)."""
    inside = np.zeros((rows, cols), dtype=bool)
    # Only pixel centres inside the bounding box can be inside the polygon.
    i0 = max(math.ceil(pts[:, 0].min()), 0)
    i1 = min(math.floor(pts[:, 0].max()), rows - 1)
    j0 = max(math.ceil(pts[:, 1].min()), 0)
    j1 = min(math.floor(pts[:, 1].max()), cols - 1)
    if i0 <= i1 and j0 <= j1:
        rr = np.arange(i0, i1 + 1, dtype=np.float64)[:, None]
        cc = np.arange(j0, j1 + 1, dtype=np.float64)[None, :]
        box = np.zeros((i1 - i0 + 1, j1 - j0 + 1), dtype=bool)
        for (ra, ca), (rb, cb) in zip(pts, np.roll(pts, -1, axis=0), strict=True):
            if ra == rb:
                continue  # a horizontal edge is never crossed by a horizontal ray
            straddles = (ra > rr) != (rb > rr)
            crossing_col = ca + (rr - ra) * (cb - ca) / (rb - ra)
            box ^= straddles & (cc < crossing_col)
        inside[i0 : i1 + 1, j0 : j1 + 1] = box
    return inside


def _dilate(masked: np.ndarray, pixels: int) -> np.ndarray:
    """``masked`` grown by ``pixels`` in every direction (a square neighbourhood), no wrap."""
    for axis in (0, 1):
        # Dilation by a square is separable: grow along rows, then columns.
        # Slicing (not np.roll) keeps the edges from wrapping around.
        n = masked.shape[axis]
        out = masked.copy()
        for k in range(1, min(pixels, n - 1) + 1):
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(None, -k), slice(k, None)
            out[tuple(hi)] |= masked[tuple(lo)]
            out[tuple(lo)] |= masked[tuple(hi)]
        masked = out
    return masked
