"""Bad input: every refused call raises a specific error, says why, and writes nothing.

Each refused call is checked against a snapshot of the registry (public
listings plus the keys of the underlying tiled containers, and the data files
of an embedded registry) taken before it. Every test runs on both backends of
the ``registry`` fixture. Cases of one kind share a test (a fresh registry
costs most of a test's time); ``check_refusals`` checks every case and reports
each failing one by its label.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import EIGER500K, SHAPE_4M, SHAPE_500K, SUMMARY, ones, random_mask
from metadata_cases import KEPT as KEPT_METADATA
from metadata_cases import REFUSED as REFUSED_METADATA
from metadata_cases import nested

from chx_masks import (
    ChxMasksError,
    DetectorNotFoundError,
    MaskExistsError,
    MaskNotFoundError,
    MaskValidationError,
)

DET = EIGER500K
TRANSPOSED = SHAPE_500K[::-1]
UNKNOWN = "pilatus_nowhere_image"
NEW_DET = "pilatus_new_image"

# The builtin each registry error also is, so `except KeyError` keeps working.
BUILTIN = {
    MaskNotFoundError: KeyError,
    DetectorNotFoundError: KeyError,
    MaskValidationError: ValueError,
    MaskExistsError: ValueError,
}

# (label, expected error, call, *fragments the message must contain)
Case = tuple[Any, ...]


# ------------------------------------------------------------------ helpers


def snapshot(registry) -> dict[str, Any]:
    """Everything a write could change, from the public API and the tiled tree."""
    top = dict(registry._root.items())  # items() spares a request per child
    state: dict[str, Any] = {"root": sorted(top)}
    if "masks" in top:
        state["masks"] = sorted(top["masks"])
    if "detectors" in top:
        state["detectors"] = {det: sorted(node) for det, node in top["detectors"].items()}
    state["get_masks"] = registry.get_masks(include_retired=True)
    state["detector_records"] = [(d.name, d.shape) for d in registry.detectors()]
    directory = Path(registry.location)
    if directory.is_dir():  # embedded: the array files too
        state["files"] = sorted(
            str(p.relative_to(directory)) for p in (directory / "data").rglob("*")
        )
    return state


def _changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    }


def _problem(error: type[Exception], call: Callable[[], Any], fragments) -> str | None:
    """What is wrong with how ``call`` is refused, or None if it is refused right."""
    try:
        call()
    except error as exc:
        message = str(exc)
        wrong = []
        if not isinstance(exc, ChxMasksError):
            wrong.append("not a ChxMasksError")
        if error in BUILTIN and not isinstance(exc, BUILTIN[error]):
            wrong.append(f"not a {BUILTIN[error].__name__}")
        missing = [f for f in fragments if f not in message]
        if missing:
            wrong.append(f"message lacks {missing}")
        return f"{'; '.join(wrong)} (message: {message!r})" if wrong else None
    except Exception as exc:
        return f"raised {type(exc).__name__}({exc}) instead of {error.__name__}"
    return f"did not raise {error.__name__}"


def check_refusals(registry, cases: Iterable[Case]) -> None:
    """Each case must raise its error naming its fragments and write nothing."""
    state = snapshot(registry)
    failures = []
    for label, error, call, *fragments in cases:
        problem = _problem(error, call, fragments)
        after = snapshot(registry)
        if after != state:
            wrote = f"wrote {_changes(state, after)}"
            problem = f"{problem}; {wrote}" if problem else wrote
            state = after  # judge the next case on its own
        if problem:
            failures.append(f"[{label!r}] {problem}")
    assert not failures, "\n".join(failures)


def refused(registry, error: type[Exception], call, *fragments: str) -> Exception:
    """Run ``call``; assert it raises ``error`` naming ``fragments`` and writes nothing."""
    before = snapshot(registry)
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, ChxMasksError)
    if error in BUILTIN:
        assert isinstance(info.value, BUILTIN[error])
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in message {message!r}"
    assert _changes(before, snapshot(registry)) == {}
    return info.value


@pytest.fixture
def base(registry) -> str:
    """One active lineage, DET/base version 0; returns its uid."""
    return registry.register_mask(DET, "base", random_mask(seed=1))


@pytest.fixture
def retired(registry) -> str:
    """A retired lineage DET/old (version 0 a mask, version 1 its retirement)."""
    uid = registry.register_mask(DET, "old", random_mask(seed=2))
    registry.delete_mask(DET, "old")
    return uid


def test_check_refusals_reports_a_write(registry):
    """The harness itself: a call that writes, or does not raise, is reported."""
    with pytest.raises(AssertionError, match=r"\['writes'\] .*wrote .*'masks'"):
        check_refusals(
            registry,
            [("writes", MaskValidationError, lambda: registry.register_mask(DET, "w", ones()))],
        )
    with pytest.raises(AssertionError, match="did not raise"):
        check_refusals(registry, [("reads", MaskNotFoundError, registry.get_masks)])


# --------------------------------------------------------------- mask content


def test_non_array_mask_is_refused(registry, base):
    masks = [(None, "NoneType"), ("mask.npy", "str"), ({"mask": 1}, "dict"), (1, "int")]
    check_refusals(
        registry,
        [
            (
                f"{op} {mask!r}",
                MaskValidationError,
                lambda op=op, name=name, mask=mask: getattr(registry, op)(DET, name, mask),
                "2-D array of bool",
                type_name,
            )
            for mask, type_name in masks
            for op, name in [("register_mask", "m"), ("update_mask", "base")]
        ],
    )
    assert [r.uid for r in registry.history(DET, "base")] == [base]


def test_list_of_lists_of_bools_is_accepted(registry):
    rows = random_mask(seed=3).tolist()
    uid = registry.register_mask(DET, "from_lists", rows)
    back = registry.get_mask(DET, "from_lists").compute()
    assert back.dtype == np.bool_
    np.testing.assert_array_equal(back, np.array(rows))
    assert registry.describe(uid).masked_pixels == int((~np.array(rows)).sum())


def test_ragged_list_of_lists_is_refused(registry):
    short_row = ones().tolist()
    short_row[7] = short_row[7][:-1]
    check_refusals(
        registry,
        [
            (
                label,
                MaskValidationError,
                lambda rows=rows: registry.register_mask(DET, "m", rows),
                "array of bool",
            )
            for label, rows in [
                ("one short row", short_row),
                ("tiny ragged", [[True, False], [True]]),
            ]
        ],
    )


def test_numeric_mask_refused_without_allow_binary(registry):
    check_refusals(
        registry,
        [
            (
                dtype.__name__,
                MaskValidationError,
                lambda dtype=dtype: registry.register_mask(DET, "m", ones().astype(dtype)),
                np.dtype(dtype).name,
                "allow_binary=True",
                "astype(bool)",
            )
            for dtype in (np.uint8, np.int64, np.float32, np.float64)
        ],
    )


def test_binary_mask_accepted_with_allow_binary(registry):
    mask = random_mask(seed=4)
    for dtype in (np.uint8, np.int32, np.float32, np.float64):
        name = f"binary_{np.dtype(dtype).name}"
        uid = registry.register_mask(DET, name, mask.astype(dtype), allow_binary=True)
        back = registry.get_mask(DET, name).compute()
        assert back.dtype == np.bool_, dtype
        np.testing.assert_array_equal(back, mask, err_msg=str(dtype))  # 1 = kept
        assert registry.describe(uid).masked_pixels == int((~mask).sum())


def test_non_binary_values_refused_even_with_allow_binary(registry):
    cases = []
    for value, dtype, shown in [
        (2, np.int64, "2"),
        (-1, np.int16, "-1"),
        (0.5, np.float64, "0.5"),
        (np.inf, np.float64, "inf"),
    ]:
        mask = ones().astype(dtype)
        mask[3, 4] = value
        cases.append(
            (
                f"{value} in {np.dtype(dtype).name}",
                MaskValidationError,
                lambda mask=mask: registry.register_mask(DET, "m", mask, allow_binary=True),
                "0 and 1",
                shown,
            )
        )
    check_refusals(registry, cases)


def test_nan_is_refused_even_with_allow_binary(registry):
    mask = ones().astype(np.float64)
    mask[10, 10] = np.nan
    check_refusals(
        registry,
        [
            (
                f"allow_binary={allow}",
                MaskValidationError,
                lambda allow=allow: registry.register_mask(DET, "m", mask, allow_binary=allow),
                "NaN",
            )
            for allow in (True, False)
        ],
    )


def test_wrong_dimensionality_is_refused(registry):
    check_refusals(
        registry,
        [
            (
                ndim,
                MaskValidationError,
                lambda mask=mask: registry.register_mask(DET, "m", mask),
                ndim,
                "514x1030",
            )
            for mask, ndim in [
                (ones().ravel(), "1-D"),
                (np.ones((2, *SHAPE_500K), dtype=bool), "3-D"),
                (np.array(True), "0-D"),
            ]
        ],
    )


def test_wrong_shape_is_refused_with_both_shapes(registry):
    error = refused(
        registry,
        MaskValidationError,
        lambda: registry.register_mask(DET, "m", ones(SHAPE_4M)),
        "2167x2070",
        "514x1030",
        DET,
    )
    assert "transposed" not in str(error)


def test_transposed_mask_is_refused_with_hint(registry):
    refused(
        registry,
        MaskValidationError,
        lambda: registry.register_mask(DET, "m", ones(TRANSPOSED)),
        "transposed",
        "mask.T",
        "1030x514",
        "514x1030",
    )


def test_bad_shape_refused_by_update_keeps_version(registry, base):
    refused(
        registry,
        MaskValidationError,
        lambda: registry.update_mask(DET, "base", ones(TRANSPOSED)),
        "mask.T",
        "1030x514",
    )
    assert [(r.uid, r.version) for r in registry.history(DET, "base")] == [(base, 0)]
    assert registry.get_mask_uid(DET, "base") == base


# ----------------------------------------------------------- unknown detector

DETECTOR_CALLS: dict[str, Callable[[Any], Any]] = {
    "register_mask": lambda reg: reg.register_mask(UNKNOWN, "m", ones()),
    "update_mask": lambda reg: reg.update_mask(UNKNOWN, "m", ones()),
    "delete_mask": lambda reg: reg.delete_mask(UNKNOWN, "m"),
    "get_mask": lambda reg: reg.get_mask(UNKNOWN, "m"),
    "get_mask_uid": lambda reg: reg.get_mask_uid(UNKNOWN, "m"),
    "get_masks": lambda reg: reg.get_masks(UNKNOWN),
    "history": lambda reg: reg.history(UNKNOWN, "m"),
    "get_composite_mask": lambda reg: reg.get_composite_mask(UNKNOWN, ["m"]),
    "resolve_composite": lambda reg: reg.resolve_composite(UNKNOWN, ["m"]),
    "get_detector": lambda reg: reg.get_detector(UNKNOWN),
}


def test_unknown_detector(registry, base):
    check_refusals(
        registry,
        [
            (
                op,
                DetectorNotFoundError,
                lambda call=call: call(registry),
                repr(UNKNOWN),
                "register_detector",
                DET,  # lists the known detectors
            )
            for op, call in DETECTOR_CALLS.items()
        ],
    )


# ---------------------------------------------------------------------- names

BAD_NAMES: list[tuple[Any, str]] = [
    ("", "''"),
    ("   ", "'   '"),
    (" chip", "use 'chip'"),
    ("chip ", "use 'chip'"),
    ("chip\n", "use 'chip'"),
    ("a/b", "'/'"),
    ("a\\b", "'\\\\'"),
    ("a?b", "'?'"),
    ("a#b", "'#'"),
    ("a%b", "'%'"),
    ("a\nb", "'\\n'"),
    ("a\x00b", "'\\x00'"),
    ("a\tb", "'\\t'"),
    ("x" * 201, "201 characters"),
    (5, "not int"),
    (None, "not NoneType"),
    (b"chip", "not bytes"),
    (["chip"], "not list"),
]


def test_bad_mask_name_refused_by_register(registry):
    check_refusals(
        registry,
        [
            (
                name,
                MaskValidationError,
                lambda name=name: registry.register_mask(DET, name, ones()),
                "mask name",
                shown,
            )
            for name, shown in BAD_NAMES
        ],
    )


NAME_CALLS: dict[str, Callable[[Any, Any], Any]] = {
    "update_mask": lambda reg, name: reg.update_mask(DET, name, ones()),
    "delete_mask": lambda reg, name: reg.delete_mask(DET, name),
    "get_mask": lambda reg, name: reg.get_mask(DET, name),
    "get_mask_uid": lambda reg, name: reg.get_mask_uid(DET, name),
    "history": lambda reg, name: reg.history(DET, name),
    "get_composite_mask": lambda reg, name: reg.get_composite_mask(DET, ["base", name]),
    "resolve_composite": lambda reg, name: reg.resolve_composite(DET, ["base", name]),
}


def test_bad_mask_name_refused_by_other_calls(registry, base):
    check_refusals(
        registry,
        [
            (
                f"{op} {name!r}",
                MaskValidationError,
                lambda call=call, name=name: call(registry, name),
                repr(name),
            )
            for op, call in NAME_CALLS.items()
            for name in ("a/b", " base")
        ],
    )


def test_bad_detector_name_refused_by_register_detector(registry):
    check_refusals(
        registry,
        [
            (
                name,
                MaskValidationError,
                lambda name=name: registry.register_detector(name, (5, 5)),
                "detector name",
                shown,
            )
            for name, shown in BAD_NAMES
        ],
    )


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_detector_names_refused(registry, name):
    refused(
        registry,
        MaskValidationError,
        lambda: registry.register_detector(name, (5, 5)),
        repr(name),
    )


def test_dotdot_detector_in_lookups_is_a_registry_error(registry, base):
    check_refusals(
        registry,
        [
            ("get_detector", ChxMasksError, lambda: registry.get_detector("..")),
            ("register_mask", ChxMasksError, lambda: registry.register_mask("..", "m", ones())),
        ],
    )


# ------------------------------------------------------------------- metadata


class _Opaque:
    pass


BAD_METADATA: list[tuple[str, Any, str]] = [
    ("set value", {"pixels": {1, 2}}, "JSON-serializable"),
    ("object value", {"thing": _Opaque()}, "JSON-serializable"),
    ("ndarray value", {"roi": np.arange(3)}, "JSON-serializable"),
    ("nan value", {"energy": float("nan")}, "NaN"),
    ("inf value", {"energy": float("inf")}, "JSON-serializable"),
    ("nested set", {"sample": {"ids": {1}}}, "JSON-serializable"),
    ("list", ["sample", "silica"], "not list"),
    ("str", "sample=silica", "not str"),
    ("int", 5, "not int"),
    ("int key", {1: "a"}, "1 is int"),
    ("None key", {None: "a"}, "None is NoneType"),
    ("tuple key", {("a", "b"): 1}, "('a', 'b') is tuple"),
    ("reserved uid", {"uid": "x"}, "'user_uid'"),
    ("reserved sha256", {"sha256": "x"}, "'user_sha256'"),
    ("reserved version", {"version": 3}, "'user_version'"),
    ("reserved detector", {"detector": "x"}, "'user_detector'"),
    ("reserved name", {"name": "x"}, "'user_name'"),
    ("reserved shape", {"shape": [1, 2]}, "'user_shape'"),
    ("dotted key", {"sample.name": "silica"}, "'sample.name'"),
    ("empty key", {"": 1}, "''"),
]

# One of each kind, for the calls other than register_mask.
SOME_BAD_METADATA = [
    case
    for case in BAD_METADATA
    if case[0] in ("set value", "list", "int key", "reserved uid", "dotted key")
]

METADATA_CALLS: dict[str, Callable[[Any, Any], Any]] = {
    "register_mask": lambda reg, md: reg.register_mask(DET, "m", ones(), metadata=md),
    "update_mask": lambda reg, md: reg.update_mask(DET, "base", ones(), metadata=md),
    "register_detector": lambda reg, md: reg.register_detector(NEW_DET, (5, 6), metadata=md),
}


@pytest.mark.parametrize("op", METADATA_CALLS)
def test_bad_metadata_is_refused(registry, base, op):
    call = METADATA_CALLS[op]
    check_refusals(
        registry,
        [
            (
                label,
                MaskValidationError,
                lambda md=md: call(registry, md),
                "metadata",
                shown,
            )
            for label, md, shown in (BAD_METADATA if op == "register_mask" else SOME_BAD_METADATA)
        ],
    )
    assert [r.uid for r in registry.history(DET, "base")] == [base]


def test_reserved_key_message_lists_reserved_keys(registry):
    error = refused(
        registry,
        MaskValidationError,
        lambda: registry.register_mask(DET, "m", ones(), metadata={"sha256": "x"}),
        "reserved",
    )
    for key in ("uid", "sha256", "version", "detector", "name"):
        assert key in str(error).split("reserved: ", 1)[1]


# ------------------------------------------------------------------------ uids


def test_unknown_uid_in_empty_registry(registry):
    uid = str(uuid.uuid4())
    check_refusals(
        registry,
        [
            (lookup, MaskNotFoundError, lambda lookup=lookup: getattr(registry, lookup)(uid), uid)
            for lookup in ("get_mask_by_uid", "describe")
        ],
    )


def test_unknown_uid(registry, base):
    uids = [
        (str(uuid.uuid4()), "No mask with uid"),
        ("not-a-uid", "not a mask uid"),
        ("base", "not a mask uid"),
        ("", "not a mask uid"),
    ]
    check_refusals(
        registry,
        [
            (
                f"{lookup} {uid!r}",
                MaskNotFoundError,
                lambda lookup=lookup, uid=uid: getattr(registry, lookup)(uid),
                uid,
                shown,
            )
            for lookup in ("get_mask_by_uid", "describe")
            for uid, shown in uids
        ],
    )


# -------------------------------------------------------------------- versions


def test_missing_or_negative_version(registry, base):
    check_refusals(
        registry,
        [
            (
                f"{lookup} version={version}",
                MaskNotFoundError,
                lambda lookup=lookup, version=version: getattr(registry, lookup)(
                    DET, "base", version=version
                ),
                f"version {version}",
                "versions: [0]",
            )
            for lookup in ("get_mask", "get_mask_uid")
            for version in (5, 1, -1)
        ],
    )


def test_version_of_a_retirement_is_not_a_mask(registry, retired):
    refused(
        registry,
        MaskNotFoundError,
        lambda: registry.get_mask(DET, "old", version=1),
        "version 1",
        "retirement",
    )


def test_non_int_version(registry, base):
    check_refusals(
        registry,
        [
            (
                f"{lookup} version={version!r}",
                MaskValidationError,
                lambda lookup=lookup, version=version: getattr(registry, lookup)(
                    DET, "base", version=version
                ),
                "version must be an integer",
                repr(version),
            )
            for lookup in ("get_mask", "get_mask_uid")
            for version in ("1", 1.5, 0.0, True, [0])
        ],
    )


# ---------------------------------------------------------------------- as_of

EARLY = "2000-01-01T00:00:00+00:00"


def test_as_of_before_first_version(registry, base):
    registered = registry.describe(base).registered_at.isoformat()
    lookups: dict[str, Callable[[], Any]] = {
        "get_mask": lambda: registry.get_mask(DET, "base", as_of=EARLY),
        "get_mask_uid": lambda: registry.get_mask_uid(DET, "base", as_of=EARLY),
        "get_composite_mask": lambda: registry.get_composite_mask(DET, ["base"], as_of=EARLY),
        "resolve_composite": lambda: registry.resolve_composite(DET, ["base"], as_of=EARLY),
    }
    check_refusals(
        registry,
        [
            (
                op,
                MaskNotFoundError,
                call,
                "2000-01-01",
                "first version was registered at",
                registered,
            )
            for op, call in lookups.items()
        ],
    )


def _as_of_refusals(registry, values, *fragments) -> list[Case]:
    """Each ``as_of`` value given to each lookup of DET/base, refused naming ``fragments``."""
    return [
        (
            f"{lookup} {as_of!r}",
            MaskValidationError,
            lambda lookup=lookup, as_of=as_of: getattr(registry, lookup)(
                DET, ["base"] if "composite" in lookup else "base", as_of=as_of
            ),
            *(repr(as_of) if f is repr else f for f in fragments),
        )
        for lookup in ("get_mask", "get_mask_uid", "resolve_composite")
        for as_of in values
    ]


def test_unparseable_as_of(registry, base):
    check_refusals(
        registry,
        _as_of_refusals(
            registry, ("yesterday", "2026-13-45", "2026-11-25 25:00"), repr, "ISO 8601"
        ),
    )


def test_as_of_outside_the_calendar(registry, base):
    import datetime

    check_refusals(
        registry,
        _as_of_refusals(
            registry,
            (1e20, -1e20, 2**70, datetime.datetime(1, 1, 1), "0001-01-01T00:00:00"),
            "as_of=",
            "'2026-11-25T10:00:00'",
        ),
    )
    # The calendar's last minute is a time like any other.
    late = registry.get_mask_uid(
        DET, "base", as_of=datetime.datetime(9999, 12, 31, 23, 59, tzinfo=datetime.timezone.utc)
    )
    assert late == base


def test_search_values_that_cannot_be_compared_are_refused(registry, base):
    check_refusals(
        registry,
        [
            (
                label,
                MaskValidationError,
                lambda query=query: registry.search(metadata=query),
                fragment,
            )
            for label, query, fragment in (
                ("nested dict", {"sample": {"name": "x"}}, "'sample.name'"),
                ("huge int", {"n": 2**70}, "int64"),
                ("huge float", {"flux": 1e300}, "1e16"),
                ("NUL", {"note": "a\x00"}, "NUL"),
                ("lone surrogate", {"note": "\udc80"}, "surrogate"),
                ("deep list", {"a": nested(300)}, "single values"),
                ("set", {"a": {1, 2}}, "single values"),
            )
        ],
    )
    assert [r.uid for r in registry.search(metadata={"n": 2**63 - 1})] == []


def test_metadata_at_the_edges_is_refused_and_writes_nothing(registry, base):
    check_refusals(
        registry,
        [
            (
                label,
                MaskValidationError,
                lambda md=md: registry.register_mask(DET, "edge", ones(), metadata=md),
                "metadata",
                fragment,
            )
            for label, md, fragment in REFUSED_METADATA
        ],
    )


def test_metadata_at_the_edges_reads_back_exactly_from_the_embedded_catalog(embedded_dir):
    from chx_masks import MaskRegistry

    with MaskRegistry.embedded(embedded_dir) as writer:
        uids = {
            label: writer.register_mask(DET, f"kept{i}", random_mask(seed=i), metadata=md)
            for i, (label, md) in enumerate(KEPT_METADATA)
        }
    with MaskRegistry.embedded(embedded_dir, disk_cache=False) as reader:
        wrong = {
            label: reader.describe(uids[label]).metadata
            for label, md in KEPT_METADATA
            if dict(reader.describe(uids[label]).metadata) != md
        }
    assert not wrong


def test_version_and_as_of_together(registry, base):
    check_refusals(
        registry,
        [
            (
                lookup,
                MaskValidationError,
                lambda lookup=lookup: getattr(registry, lookup)(
                    DET, "base", version=0, as_of="2100-01-01T00:00:00+00:00"
                ),
                "not both",
            )
            for lookup in ("get_mask", "get_mask_uid")
        ],
    )


# --------------------------------------------------------- lineage state errors


def test_register_of_active_name(registry, base):
    original = registry.get_mask(DET, "base").compute()
    refused(
        registry,
        MaskExistsError,
        lambda: registry.register_mask(DET, "base", ones()),
        "update_mask",
        "base",
        base,
    )
    assert registry.get_mask_uid(DET, "base") == base
    assert [r.uid for r in registry.history(DET, "base")] == [base]
    np.testing.assert_array_equal(registry.get_mask(DET, "base").compute(), original)


def test_update_or_delete_of_unregistered_name(registry, base):
    check_refusals(
        registry,
        [
            (
                "update_mask",
                MaskNotFoundError,
                lambda: registry.update_mask(DET, "never", ones()),
                "never",
                "register_mask",
            ),
            (
                "delete_mask",
                MaskNotFoundError,
                lambda: registry.delete_mask(DET, "never"),
                "never",
                "register_mask",
            ),
        ],
    )


def test_update_or_delete_of_retired_name(registry, retired):
    check_refusals(
        registry,
        [
            (
                "update_mask",
                MaskNotFoundError,
                lambda: registry.update_mask(DET, "old", ones()),
                "old",
                "retired",
                "register_mask",
            ),
            (
                "delete_mask",
                MaskNotFoundError,
                lambda: registry.delete_mask(DET, "old"),
                "old",
                "retired",
                "register_mask",
            ),
        ],
    )
    assert [r.uid for r in registry.history(DET, "old")] == [retired]
    assert registry.get_masks() == []


# ------------------------------------------------------------------ composites

BAD_NAME_LISTS: list[tuple[str, Any, type[Exception], str]] = [
    ("empty list", [], MaskValidationError, "at least one"),
    ("bare string", "base", MaskValidationError, "['base']"),
    ("duplicate", ["base", "other", "base"], MaskValidationError, "['base']"),
    ("unknown among known", ["base", "missing", "other"], MaskNotFoundError, "missing"),
    ("retired among known", ["base", "old", "other"], MaskNotFoundError, "retired"),
]


def test_bad_composite_names(registry, base, retired):
    registry.register_mask(DET, "other", random_mask(seed=5))
    check_refusals(
        registry,
        [
            (
                f"{lookup} {label}",
                error,
                lambda lookup=lookup, names=names: getattr(registry, lookup)(DET, names),
                shown,
            )
            for lookup in ("get_composite_mask", "resolve_composite")
            for label, names, error, shown in BAD_NAME_LISTS
        ],
    )


def test_non_iterable_composite_names(registry, base):
    check_refusals(
        registry,
        [
            (
                f"{lookup} {names!r}",
                MaskValidationError,
                lambda lookup=lookup, names=names: getattr(registry, lookup)(DET, names),
            )
            for lookup in ("get_composite_mask", "resolve_composite")
            for names in (None, 5)
        ],
    )


# ------------------------------------------------------------------- detectors


def test_register_detector_bad_shape(registry):
    shapes = [(0, 5), (5,), "abc", (3, 4, 5), (-2, 5), (), None, 5, ("a", "b")]
    check_refusals(
        registry,
        [
            (
                shape,
                MaskValidationError,
                lambda shape=shape: registry.register_detector(NEW_DET, shape),
                "two positive integers",
                repr(shape),
            )
            for shape in shapes
        ],
    )


@pytest.mark.parametrize("shape", ["12", (2.5, 3), (True, 3)], ids=repr)
def test_register_detector_non_integer_shape(registry, shape):
    refused(
        registry,
        MaskValidationError,
        lambda: registry.register_detector(NEW_DET, shape),
        "two positive integers",
    )


def test_reregister_builtin_detector_with_other_shape(registry, base):
    check_refusals(
        registry,
        [
            (
                shape,
                MaskExistsError,
                lambda shape=shape: registry.register_detector(DET, shape),
                DET,
                "514x1030",
                "x".join(map(str, shape)),
            )
            for shape in (TRANSPOSED, SHAPE_4M, (514, 1031))
        ],
    )
    assert registry.get_detector(DET).shape == SHAPE_500K


def test_reregister_builtin_detector_before_any_write(registry):
    refused(
        registry,
        MaskExistsError,
        lambda: registry.register_detector(DET, (5, 5)),
        "514x1030",
        "5x5",
    )


def test_reregister_custom_detector_with_other_shape(registry):
    registry.register_detector(NEW_DET, (7, 9))
    refused(
        registry,
        MaskExistsError,
        lambda: registry.register_detector(NEW_DET, (9, 7)),
        "7x9",
        "9x7",
    )
    assert registry.get_detector(NEW_DET).shape == (7, 9)


def test_mask_for_custom_detector_of_wrong_shape(registry):
    registry.register_detector(NEW_DET, (7, 9))
    refused(
        registry,
        MaskValidationError,
        lambda: registry.register_mask(NEW_DET, "m", np.ones((9, 7), dtype=bool)),
        "7x9",
        "9x7",
        "mask.T",
    )


# ---------------------------------------------------------------------- search


def test_search_with_unserializable_value(registry, base):
    refused(registry, MaskValidationError, lambda: registry.search(metadata={"pixels": {1, 2}}))


@pytest.mark.slow
def test_the_malformed_input_table_on_the_embedded_registry(embedded_dir):
    """Every case of tests/input_table.py: a ChxMasksError and nothing written, or kept.

    Over HTTP, the same table runs on a deployed server with each catalog
    (``test_server.py::test_the_malformed_input_table_on_every_catalog``).
    """
    import input_table

    from chx_masks import MaskRegistry

    with MaskRegistry.embedded(embedded_dir) as registry:
        registry.register_mask(DET, "base", random_mask(seed=1))
        shape = registry.get_detector(DET).shape
        counts, problems = input_table.run(registry, DET, "base", shape)
    SUMMARY.setdefault("malformed-input cases (embedded registry)", {})["outcomes"] = counts
    assert sum(counts.values()) >= 155
    assert problems == []
