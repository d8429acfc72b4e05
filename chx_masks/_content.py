"""Checks and hashes applied to what callers hand the registry, before anything is written.

Used by :mod:`chx_masks._registry` on every write and by readers to verify
stored masks.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import unicodedata
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, TypeAlias

import numpy as np

from ._errors import MaskValidationError

# Keys the registry writes into a stored mask's metadata; user metadata may
# not use them, or a search on them would mix the two.
RESERVED_KEYS = frozenset(
    {
        "spec",
        "uid",
        "detector",
        "name",
        "version",
        "kind",
        "sha256",
        "shape",
        "masked_pixels",
        "created_at",
        "created_by",
        "registered_at",
        "superseded_at",
        "retired_at",
        "chx_masks",
        "sealed",
    }
)

# The metadata key that marks a stored mask's record as complete: False while
# its array is being written, True once it is written and claimed (see
# chx_masks.policy). It is left out of the record's hash.
SEALED = "sealed"

# The tiled scope of keys that may purge (tiled's admins hold it).
ADMIN_SCOPE = "admin:apikeys"

# Characters that tiled cannot carry in a node key through a URL path.
_FORBIDDEN_NAME_CHARS = frozenset("/\\?#%")
MAX_NAME_LENGTH = 200


def mask_sha256(mask: np.ndarray) -> str:
    """Content hash of a boolean mask: shape, then the packed bits.

    Parameters
    ----------
    mask : numpy.ndarray
        A 2-D array of bool.

    Returns
    -------
    str
        Hex digest of sha256 over the shape (two little-endian uint64) followed
        by ``numpy.packbits(mask, bitorder="little")`` in C order.

    Examples
    --------
    >>> import numpy as np
    >>> mask_sha256(np.ones((2, 3), dtype=bool))[:12]
    '4594190e294c'
    """
    h = hashlib.sha256()
    h.update(struct.pack("<" + "Q" * mask.ndim, *mask.shape))
    h.update(np.packbits(np.ascontiguousarray(mask), bitorder="little").tobytes())
    return h.hexdigest()


def record_sha256(metadata: Mapping[str, Any]) -> str:
    """Hash of a stored mask's metadata record, as the slot that claims it keeps it.

    Numbers are hashed by value (an integral float as the integer), keys in
    sorted order and ``sealed`` left out, so the record hashes the same
    before and after it is sealed and on every catalog (PostgreSQL hands
    ``1e15`` back as ``1000000000000000``).

    Examples
    --------
    >>> record_sha256({"a": 1.0, "b": [2, "x"]}) == record_sha256({"b": [2, "x"], "a": 1})
    True
    >>> record_sha256({"a": 1}) == record_sha256({"a": 1, "sealed": True})
    True
    """
    canonical = {k: v for k, v in metadata.items() if k != SEALED}
    text = json.dumps(_canonical(canonical), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def check_name(value: Any, what: str = "mask name") -> str:
    """Return ``value`` if it can name a mask or detector, else raise.

    Examples
    --------
    >>> check_name("chip_mask")
    'chip_mask'
    """
    if not isinstance(value, str):
        raise MaskValidationError(
            f"The {what} must be a string, not {type(value).__name__} ({value!r})."
        )
    if not value.strip():
        raise MaskValidationError(
            f"The {what} {value!r} is empty or only white space; give a name such as 'chip_mask'."
        )
    if value != value.strip():
        raise MaskValidationError(
            f"The {what} {value!r} starts or ends with white space; use {value.strip()!r}."
        )
    if set(value) == {"."}:
        raise MaskValidationError(
            f"The {what} {value!r} is only dots, which tiled reads as a path step; "
            "give a name such as 'chip_mask'."
        )
    if len(value) > MAX_NAME_LENGTH:
        raise MaskValidationError(
            f"The {what} is {len(value)} characters long; at most {MAX_NAME_LENGTH} are allowed."
        )
    bad = sorted(
        {c for c in value if c in _FORBIDDEN_NAME_CHARS or unicodedata.category(c)[0] == "C"}
    )
    if bad:
        raise MaskValidationError(
            f"The {what} {value!r} contains {', '.join(repr(c) for c in bad)}; "
            "names may not contain '/', '\\', '?', '#', '%' or control characters. "
            "Use letters, digits, '_', '-' or '.'."
        )
    return value


#: The largest metadata (as JSON) stored with one mask version.
MAX_METADATA_BYTES = 256 * 1024
#: The deepest nesting of dicts and lists kept in metadata.
MAX_METADATA_DEPTH = 32
#: Integers that every catalog (SQLite, PostgreSQL) stores and serves back: int64.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Floats from this magnitude on come back from PostgreSQL's JSON as integers
#: (it writes 1e+20 as 100000000000000000000), and past 2**64 not at all.
FLOAT_MAX = 1e16


def check_storable(value: Any, where: str = "metadata") -> None:
    """Refuse, naming where, a JSON value that some catalog would not serve back equal.

    Every catalog must give back what was stored: integers within int64,
    floats below 1e16 in magnitude (larger ones come back from PostgreSQL as
    integers, or not at all), strings of valid Unicode without NUL (which
    PostgreSQL refuses), string keys at every level, at most
    :data:`MAX_METADATA_DEPTH` levels of nesting. Other types are left to the
    JSON check that follows.

    Examples
    --------
    >>> check_storable({"flux": 2e12, "runs": [1, 2**40]})
    >>> try:
    ...     check_storable({"flux": 1e20})
    ... except ValueError as err:
    ...     print(str(err)[:49])
    metadata['flux'] = 1e+20 cannot be stored exactly
    """
    # (value, where it is, depth, where its top-level entry is); no recursion, so
    # any depth is refused, not a RecursionError.
    stack: list[tuple[Any, str, int, str]] = [(value, where, 0, where)]
    while stack:
        item, at, depth, top = stack.pop()
        if depth == 1:
            top = at
        if isinstance(item, (Mapping, list, tuple)):
            if depth >= MAX_METADATA_DEPTH:
                raise MaskValidationError(
                    f"{top} is nested more than {MAX_METADATA_DEPTH} levels deep: flatten it "
                    "(or store it as a string)."
                )
            if isinstance(item, Mapping):
                for key, child in item.items():
                    if not isinstance(key, str):
                        raise MaskValidationError(
                            f"{at} has key {key!r} of type {type(key).__name__}: keys must be "
                            "strings at every level."
                        )
                    _check_text(key, f"the key {key!r} of {at}")
                    stack.append((child, f"{at}[{key!r}]", depth + 1, top))
            else:
                stack.extend((child, f"{at}[{i}]", depth + 1, top) for i, child in enumerate(item))
        else:
            _check_scalar(item, at)


def _check_scalar(item: Any, at: str) -> None:
    """Refuse a string, integer or float at ``at`` that a catalog would not serve back equal."""
    if isinstance(item, str):
        _check_text(item, at)
    elif isinstance(item, bool) or item is None:
        return
    elif isinstance(item, int):
        if not INT64_MIN <= item <= INT64_MAX:
            raise MaskValidationError(
                f"{at} = {item} is outside the integers every catalog stores (int64, "
                f"{INT64_MIN} to {INT64_MAX}). Store it as a string or in other units."
            )
    elif isinstance(item, float) and math.isfinite(item) and abs(item) >= FLOAT_MAX:
        raise MaskValidationError(
            f"{at} = {item!r} cannot be stored exactly: numbers must be integers within "
            f"int64 or floats below 1e16 in magnitude. Store it as a string ('{item!r}') "
            "or in other units."
        )


def _check_text(text: str, at: str) -> None:
    if "\x00" in text:
        raise MaskValidationError(
            f"{at} contains a NUL character (\\x00), which the catalog cannot store: remove it."
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise MaskValidationError(
            f"{at} is not valid Unicode (a lone surrogate {text[err.start]!r} at position "
            f"{err.start}); decode the bytes it came from with the right encoding."
        ) from None


def check_metadata(metadata: Any) -> dict[str, Any]:
    """Return a JSON-clean copy of user metadata, or raise.

    Examples
    --------
    >>> check_metadata({"sample": "silica", "energy_keV": 9.65})
    {'sample': 'silica', 'energy_keV': 9.65}
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise MaskValidationError(f"metadata must be a dict, not {type(metadata).__name__}.")
    for key in metadata:
        if not isinstance(key, str):
            raise MaskValidationError(
                f"metadata keys must be strings; {key!r} is {type(key).__name__}."
            )
        if key in RESERVED_KEYS:
            raise MaskValidationError(
                f"metadata key {key!r} is reserved by the registry (reserved: "
                f"{', '.join(sorted(RESERVED_KEYS))}); rename it, e.g. "
                f"'user_{key}'."
            )
        if "." in key or not key.strip():
            said = f"metadata key {key!r} is empty or contains '.'; tiled reads dots as nesting"
            raise MaskValidationError(
                f"{said} in searches, so nest a dict instead.",
                cli=f"{said} in searches, so give a JSON object instead, e.g. "
                '-m \'sample={"name": "silica"}\'.',
            )
    check_storable(dict(metadata))
    try:
        text = json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as err:
        where = next((k for k, v in metadata.items() if not _json_ok(v)), None)
        at = f" (key {where!r})" if where is not None else ""
        said = (
            f"metadata must be JSON-serializable (str, numbers, bool, None, lists "
            f"and dicts; no NaN/inf): {err}{at}."
        )
        raise MaskValidationError(
            f"{said} Convert the offending value, e.g. a numpy scalar with .item() or a "
            "datetime with .isoformat().",
            cli=f"{said} Give that -m value as a string or a finite number.",
        ) from err
    if len(text) > MAX_METADATA_BYTES:
        biggest = max(metadata, key=lambda k: len(json.dumps(metadata[k])))
        raise MaskValidationError(
            f"metadata is {len(text) / 1024:.0f} KiB as JSON; at most "
            f"{MAX_METADATA_BYTES // 1024} KiB is stored with a mask (it is sent with "
            f"every listing). The largest entry is {biggest!r}: register large data "
            "as a mask or file of its own and put its uid or path in the metadata."
        )
    return json.loads(text)


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def coerce_mask(
    mask: Any, shape: tuple[int, ...], detector: str, *, allow_binary: bool = False
) -> np.ndarray:
    """Return ``mask`` as a C-contiguous bool array of ``shape``, or raise.

    Nested lists of bools are accepted and converted. Integer or float arrays
    are refused unless ``allow_binary`` is true and every value is 0 or 1
    (1 = pixel kept). NaN is always refused.

    Examples
    --------
    >>> coerce_mask([[True, False]], (1, 2), "tiny").dtype
    dtype('bool')
    """
    if isinstance(mask, (str, bytes, Mapping)) or mask is None or np.isscalar(mask):
        raise MaskValidationError(f"A mask must be a 2-D array of bool, not {type(mask).__name__}.")
    try:
        arr = np.asarray(mask)
    except (TypeError, ValueError) as err:
        raise MaskValidationError(
            f"Cannot read {type(mask).__name__} as an array of bool: {err}."
        ) from err
    if arr.size == 0:
        raise MaskValidationError(
            f"The mask is empty: shape {'x'.join(map(str, arr.shape))}; a mask of "
            f"{detector} is {'x'.join(map(str, shape))} pixels."
        )
    if arr.dtype == object:
        raise MaskValidationError(
            "A mask must be a 2-D array of bool; this one has dtype object "
            "(ragged rows or mixed types?)."
        )
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise MaskValidationError(
            f"The mask contains {int(np.isnan(arr).sum())} NaN values; a mask "
            "holds True (keep) or False (masked) only."
        )
    if arr.dtype != np.bool_:
        arr = _binary_to_bool(arr, allow_binary)
    if arr.ndim != 2:
        raise MaskValidationError(
            f"A mask must be 2-D like the detector {detector!r} {shape_str(shape)}; "
            f"got {arr.ndim}-D with shape {shape_str(arr.shape)}."
        )
    if arr.shape != tuple(shape):
        said = (
            f"The mask has shape {shape_str(arr.shape)} but detector {detector!r} "
            f"is {shape_str(shape)}."
        )
        if arr.shape != tuple(shape)[::-1]:
            raise MaskValidationError(said)
        raise MaskValidationError(
            f"{said} It is transposed: use mask.T.",
            cli=f"{said} It is transposed (rows and columns swapped): save the "
            "transposed array (mask.T in NumPy) and give that file.",
        )
    return np.ascontiguousarray(arr)


def _binary_to_bool(arr: np.ndarray, allow_binary: bool) -> np.ndarray:
    """A numeric (not bool) mask array as bool, if ``allow_binary`` and it holds only 0/1."""
    if arr.dtype.kind not in "uif":
        raise MaskValidationError(f"A mask must be an array of bool, not of dtype {arr.dtype}.")
    if not allow_binary:
        raise MaskValidationError(
            f"A mask must be an array of bool; got dtype {arr.dtype}. Convert "
            "it yourself (e.g. `mask.astype(bool)`, checking the convention: "
            "True = pixel kept) or pass allow_binary=True to accept 0/1 values."
        )
    if not np.isin(arr, (0, 1)).all():
        raise MaskValidationError(
            f"allow_binary=True accepts only 0 and 1, but the {arr.dtype} mask "
            f"holds values such as {np.unique(arr[~np.isin(arr, (0, 1))])[:5].tolist()}."
        )
    return arr.astype(bool)


def shape_str(shape: tuple[int, ...]) -> str:
    """``(2167, 2070)`` -> ``'2167x2070'``."""
    return "x".join(str(n) for n in shape)


#: A time as ``as_of=`` takes it: a datetime (naive = local time), an ISO 8601
#: string, or POSIX seconds; :func:`to_datetime` reads it.
TimeLike: TypeAlias = datetime | str | float


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def to_datetime(value: Any, what: str = "as_of") -> datetime:
    """Read a time given as datetime, ISO 8601 string or POSIX seconds; UTC-aware.

    A naive datetime or ISO string without offset is taken as local time, the
    way a beamline user types it.

    Examples
    --------
    >>> to_datetime("2026-01-02T03:04:05+00:00").isoformat()
    '2026-01-02T03:04:05+00:00'
    >>> to_datetime(0).year
    1970
    """
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise MaskValidationError(f"{what}={value!r} is not a finite time.")
        try:
            return datetime.fromtimestamp(value, timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise MaskValidationError(
                f"{what}={value!r} seconds is outside the times a datetime holds (years 1 "
                "to 9999): give a time such as '2026-11-25T10:00:00'."
            ) from None
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError as err:
            example = "such as '2026-11-25T10:00:00'."
            raise MaskValidationError(
                f"{what}={value!r} is not an ISO 8601 time {example}",
                cli=f"--{what.replace('_', '-')} {value!r} is not an ISO 8601 time {example}",
            ) from err
    else:
        raise MaskValidationError(
            f"{what} must be a datetime, ISO 8601 string or POSIX seconds, not "
            f"{type(value).__name__}."
        )
    try:
        if dt.tzinfo is None:
            dt = dt.astimezone()
        return dt.astimezone(timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise MaskValidationError(
            f"{what}={value!r} cannot be converted to UTC (too close to year 1 or 9999): "
            "give a time such as '2026-11-25T10:00:00'."
        ) from None
