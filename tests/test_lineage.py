"""Lineages as pure functions of their slots: no tiled, no registry."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from chx_masks import MaskExistsError, MaskNotFoundError, MaskValidationError
from chx_masks._lineage import (
    _lineage_start,
    _lookup_names,
    _next_claim,
    _refuse_active,
    _refuse_inactive,
    _select,
    _slot_from_metadata,
    _starts_after,
    _validity,
    _version_record,
)
from chx_masks._store import _Slot, _Stored

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
DET, NAME = "eiger500K_single_image", "gaps"


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def mask(version: int, minutes: float) -> _Slot:
    return _Slot(NAME, version, "mask", f"uid-{version}", at(minutes))


def retired(version: int, minutes: float) -> _Slot:
    return _Slot(NAME, version, "retired", None, at(minutes))


# v0, v1, retired as v2, then a new lineage of the name: v3, v4.
HISTORY = [mask(0, 0), mask(1, 10), retired(2, 20), mask(3, 30), mask(4, 40)]


def test_the_current_version_is_the_last_slot():
    assert _select(DET, NAME, HISTORY, None, None) is HISTORY[-1]


def test_a_version_selects_that_slot_even_in_a_retired_lineage():
    assert _select(DET, NAME, HISTORY, 1, None).uid == "uid-1"
    assert _select(DET, NAME, HISTORY, 3, None).uid == "uid-3"


def test_the_version_of_a_retirement_is_not_a_mask():
    with pytest.raises(MaskNotFoundError, match="version 2 is the record of its retirement"):
        _select(DET, NAME, HISTORY, 2, None)


def test_a_missing_version_names_the_versions_there_are():
    with pytest.raises(MaskNotFoundError, match=r"has no version 7; versions: \[0, 1, 3, 4\]"):
        _select(DET, NAME, HISTORY, 7, None)


@pytest.mark.parametrize(
    ("minutes", "version"),
    [(0, 0), (5, 0), (10, 1), (19.9, 1), (30, 3), (39, 3), (40, 4), (1e6, 4)],
)
def test_as_of_selects_the_version_valid_then(minutes, version):
    assert _select(DET, NAME, HISTORY, None, at(minutes)).version == version


def test_as_of_while_retired_or_before_the_first_version_is_refused():
    with pytest.raises(MaskNotFoundError, match="was retired at"):
        _select(DET, NAME, HISTORY, None, at(25))
    with pytest.raises(MaskNotFoundError, match="did not exist at"):
        _select(DET, NAME, HISTORY, None, at(-1))


def test_a_retired_lineage_has_no_current_version():
    with pytest.raises(MaskNotFoundError, match="was retired at 2026-03-01 12:20:00 UTC") as err:
        _select(DET, NAME, HISTORY[:3], None, None)
    assert "chx-masks register" in err.value.cli


def test_the_lineage_starts_after_the_last_retirement():
    assert _lineage_start(HISTORY) == 3
    assert _lineage_start(HISTORY[:2]) == 0
    assert _lineage_start(HISTORY[:3]) == 3  # nothing after it yet
    assert _lineage_start([]) == 0


def test_the_next_claim_follows_the_last_version():
    assert _next_claim([], None, at(0)) == (0, at(0))
    assert _next_claim(HISTORY, None, at(50)) == (5, at(50))
    assert _next_claim(HISTORY, 9, at(50)) == (9, at(50))


def test_a_claim_never_starts_before_the_version_it_follows():
    # A writer whose clock runs behind still starts after the last version.
    version, start = _next_claim(HISTORY, None, at(1))
    assert version == 5
    assert start > HISTORY[-1].at
    assert start - HISTORY[-1].at == timedelta(microseconds=1)
    assert _starts_after(None, at(1)) == at(1)
    assert _starts_after(at(0), at(1)) == at(1)


def test_validity_comes_from_the_slot_that_follows():
    assert _validity(HISTORY, 0) == (at(10), None)  # superseded by v1
    assert _validity(HISTORY, 1) == (None, at(20))  # retired by v2
    assert _validity(HISTORY, 4) == (None, None)  # current


def test_a_record_joins_its_slot_and_what_its_mask_says():
    stored = _Stored("uid-1", DET, NAME, "ab" * 32, (2, 3), 1, {"sample": "silica"})
    record = _version_record(HISTORY, 1, stored)
    assert (record.uid, record.version, record.registered_at) == ("uid-1", 1, at(10))
    assert (record.superseded_at, record.retired_at) == (None, at(20))
    assert record.metadata == {"sample": "silica"}
    purge = {"detector": DET, "sha256": "cd" * 32, "shape": [2, 3], "by": "x", "reason": "r"}
    purged = _version_record(HISTORY, 0, None, purge)
    assert purged.superseded_at == at(10)
    assert purged.metadata == {"purged": {"at": None, "by": "x", "reason": "r"}}


def test_a_slot_is_read_only_from_a_node_whose_key_is_its_claim():
    md = {"name": NAME, "version": 3, "kind": "mask", "uid": "u", "at": at(30).isoformat()}
    assert _slot_from_metadata(f"{NAME}@3", md) == _Slot(NAME, 3, "mask", "u", at(30))
    assert _slot_from_metadata(f"{NAME}@4", md) is None


def test_starting_and_changing_a_lineage_are_refused_in_the_wrong_state():
    _refuse_active(DET, NAME, HISTORY[:3])  # retired: may start again
    with pytest.raises(MaskExistsError, match="already registered"):
        _refuse_active(DET, NAME, HISTORY)
    _refuse_inactive(DET, NAME, HISTORY)
    with pytest.raises(MaskNotFoundError, match="is registered"):
        _refuse_inactive(DET, NAME, [])
    with pytest.raises(MaskNotFoundError, match="was retired"):
        _refuse_inactive(DET, NAME, HISTORY[:3])


def test_lookup_names_are_checked_before_anything_is_read():
    assert _lookup_names(("a", "b"), None, None) == ["a", "b"]
    for names, version, as_of, said in [
        ("a", None, None, "not the string"),
        ([], None, None, "at least one"),
        (["a", "a"], None, None, "repeat"),
        (["a"], 1, at(0), "not both"),
        (["a"], True, None, "must be an integer"),
    ]:
        with pytest.raises(MaskValidationError, match=said):
            _lookup_names(names, version, as_of)
