"""Masks of the older CHX flat layout: read as they are, then adopted into the registry.

The older layout put array nodes straight into the registry's container, keyed
by uid, with metadata ``{"spec": "mask", "name", "detector", "version"}`` (and
whatever else the writer added); bool or uint8 0/1 arrays. They are written
here with plain tiled, exactly as the old code did.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

import chx_masks
from chx_masks import BUILTIN_DETECTORS, DetectorNotFoundError, MaskNotFoundError, MaskRegistry

EIGER500K = "eiger500K_single_image"
SHAPE_500K = BUILTIN_DETECTORS[EIGER500K].shape


def random_mask(shape=SHAPE_500K, fraction=0.05, seed=0) -> np.ndarray:
    """About ``fraction`` of the pixels masked (False), reproducibly."""
    return np.random.default_rng(seed).random(shape) >= fraction


def write_legacy(
    registry: MaskRegistry,
    detector: str,
    name: str,
    version: int,
    mask: np.ndarray,
    *,
    dtype: type = bool,
    extra: dict | None = None,
) -> str:
    """Write ``mask`` the way the older CHX code did; return its uid."""
    uid = str(uuid.uuid4())
    metadata = {"spec": "mask", "name": name, "detector": detector, "version": version}
    metadata.update(extra or {})
    registry._root.write_array(np.asarray(mask).astype(dtype), key=uid, metadata=metadata)
    return uid


def masks_keys(registry: MaskRegistry) -> list[str] | None:
    """Keys of ``masks/`` (None if the registry never created it)."""
    root = registry._root
    return sorted(root["masks"]) if "masks" in root else None


def snapshot(registry: MaskRegistry) -> dict:
    """Everything adoption could change, read straight from tiled."""
    root = registry._root
    state = {"root": sorted(root), "masks": masks_keys(registry), "get_masks": registry.get_masks()}
    if "detectors" in root:
        detectors = root["detectors"]
        state["detectors"] = {det: sorted(detectors[det]) for det in sorted(detectors)}
    return state


def fresh(registry: MaskRegistry) -> MaskRegistry:
    """A second registry on the same tiled container, with empty caches."""
    return MaskRegistry(registry._root, location=registry.location)


@pytest.fixture
def legacy_lineage(registry):
    """Three legacy versions of one name: bool, uint8 0/1, bool; extra metadata on each."""
    masks = {k: random_mask(seed=100 + k, fraction=0.02 * (k + 1)) for k in range(3)}
    dtypes = {0: bool, 1: np.uint8, 2: bool}
    uids = {
        k: write_legacy(
            registry,
            EIGER500K,
            "old_beamstop",
            k,
            masks[k],
            dtype=dtypes[k],
            extra={"comment": f"drawn by hand, pass {k}", "operator": "chx"},
        )
        for k in range(3)
    }
    return masks, uids


# ---------------------------------------------------------------- before adoption


@pytest.mark.parametrize("dtype", [bool, np.uint8])
def test_legacy_uid_reads_before_adoption(registry, dtype):
    mask = random_mask(seed=7)
    uid = write_legacy(
        registry,
        EIGER500K,
        "hot_pixels",
        3,
        mask,
        dtype=dtype,
        extra={"comment": "from the 2022 run"},
    )

    got = registry.get_mask_by_uid(uid).compute()
    assert got.dtype == np.bool_
    assert got.shape == SHAPE_500K
    np.testing.assert_array_equal(got, mask)

    record = registry.describe(uid)
    assert record.legacy is True
    assert record.uid == uid
    assert (record.detector, record.name, record.version) == (EIGER500K, "hot_pixels", 3)
    assert record.sha256 == chx_masks.mask_sha256(mask)
    assert record.masked_pixels == int((~mask).sum())
    assert dict(record.metadata) == {"comment": "from the 2022 run"}
    # Not yet adopted: name look-ups do not see it.
    assert registry.get_masks() == []
    with pytest.raises(MaskNotFoundError):
        registry.get_mask_uid(EIGER500K, "hot_pixels")


def test_legacy_uid_reads_when_masks_container_exists(registry):
    """A registry already in use (masks/ exists) still resolves legacy uids."""
    registry.register_mask(EIGER500K, "modern", random_mask(seed=1))
    mask = random_mask(seed=2)
    uid = write_legacy(registry, EIGER500K, "old", 0, mask, dtype=np.uint8)
    np.testing.assert_array_equal(fresh(registry).get_mask_by_uid(uid).compute(), mask)
    assert fresh(registry).describe(uid).legacy is True


# ---------------------------------------------------------------------- dry run


def test_dry_run_lists_and_writes_nothing(registry, legacy_lineage):
    masks, uids = legacy_lineage
    before = snapshot(registry)
    assert before["masks"] is None

    planned = registry.adopt_legacy(dry_run=True)

    assert sorted(r.uid for r in planned) == sorted(uids.values())
    assert {(r.detector, r.name, r.version, r.uid) for r in planned} == {
        (EIGER500K, "old_beamstop", k, uid) for k, uid in uids.items()
    }
    assert all(r.legacy for r in planned)
    assert snapshot(registry) == before
    assert snapshot(fresh(registry)) == before

    # The same once the registry has its own containers.
    registry.register_mask(EIGER500K, "modern", random_mask(seed=9))
    before = snapshot(registry)
    assert before["masks"] is not None and len(before["masks"]) == 1
    planned = registry.adopt_legacy(dry_run=True)
    assert sorted(r.uid for r in planned) == sorted(uids.values())
    assert snapshot(registry) == before
    for k, uid in uids.items():
        assert registry.describe(uid).legacy is True
        np.testing.assert_array_equal(registry.get_mask_by_uid(uid).compute(), masks[k])


# --------------------------------------------------------------------- adoption


def test_adopt_keeps_uids_versions_and_metadata(registry, legacy_lineage):
    masks, uids = legacy_lineage

    adopted = registry.adopt_legacy()

    assert sorted(r.uid for r in adopted) == sorted(uids.values())
    assert all(not r.legacy for r in adopted)
    assert registry.get_masks() == [(EIGER500K, "old_beamstop")]
    assert sorted(registry._root["masks"]) == sorted(uids.values())

    for reg in (registry, fresh(registry)):
        assert reg.get_mask_uid(EIGER500K, "old_beamstop") == uids[2]
        current = reg.get_mask(EIGER500K, "old_beamstop").compute()
        np.testing.assert_array_equal(current, masks[2])
        for k, uid in uids.items():
            assert reg.get_mask_uid(EIGER500K, "old_beamstop", version=k) == uid
            got = reg.get_mask(EIGER500K, "old_beamstop", version=k).compute()
            assert got.dtype == np.bool_
            np.testing.assert_array_equal(got, masks[k])
            np.testing.assert_array_equal(reg.get_mask_by_uid(uid).compute(), masks[k])

            record = reg.describe(uid)
            assert record.legacy is False
            assert (record.uid, record.detector, record.name, record.version) == (
                uid,
                EIGER500K,
                "old_beamstop",
                k,
            )
            assert record.sha256 == chx_masks.mask_sha256(masks[k])
            assert record.masked_pixels == int((~masks[k]).sum())
            assert record.registered_at is not None
            assert record.metadata["comment"] == f"drawn by hand, pass {k}"
            assert record.metadata["operator"] == "chx"
            assert record.active is (k == 2)

        history = reg.history(EIGER500K, "old_beamstop")
        assert [(r.version, r.uid) for r in history] == [(k, uids[k]) for k in range(3)]
        assert [r.active for r in history] == [False, False, True]

    # The stored copy is a real registry mask: bool, the legacy content.
    for k, uid in uids.items():
        stored = np.asarray(registry._root["masks"][uid].read())
        assert stored.dtype == np.bool_
        np.testing.assert_array_equal(stored, masks[k])


def test_adopted_masks_are_searchable_by_legacy_metadata(registry, legacy_lineage):
    _, uids = legacy_lineage
    registry.adopt_legacy()
    found = registry.search(metadata={"comment": "drawn by hand, pass 1"}, all_versions=True)
    assert [r.uid for r in found] == [uids[1]]


def test_adopting_twice_adopts_nothing_the_second_time(registry, legacy_lineage):
    _, uids = legacy_lineage
    first = registry.adopt_legacy()
    assert len(first) == 3
    after_first = snapshot(registry)
    history = [
        (r.version, r.uid, r.registered_at) for r in registry.history(EIGER500K, "old_beamstop")
    ]

    assert registry.adopt_legacy() == []
    assert fresh(registry).adopt_legacy() == []
    assert registry.adopt_legacy(dry_run=True) == []

    assert snapshot(registry) == after_first
    assert [
        (r.version, r.uid, r.registered_at)
        for r in fresh(registry).history(EIGER500K, "old_beamstop")
    ] == history


def test_adoption_registers_unknown_detector_with_legacy_shape(registry):
    shape = (37, 53)
    mask = np.ones(shape, dtype=bool)
    mask[5:9, 11:20] = False
    uid = write_legacy(registry, "pilatus_legacy_image", "frame", 1, mask, dtype=np.uint8)

    with pytest.raises(DetectorNotFoundError):
        registry.get_detector("pilatus_legacy_image")
    assert registry.describe(uid).detector == "pilatus_legacy_image"

    adopted = registry.adopt_legacy()

    assert [r.uid for r in adopted] == [uid]
    for reg in (registry, fresh(registry)):
        detector = reg.get_detector("pilatus_legacy_image")
        assert detector.shape == shape
        assert detector.builtin is False
        assert "pilatus_legacy_image" in [d.name for d in reg.detectors()]
        assert reg.get_masks() == [("pilatus_legacy_image", "frame")]
        assert reg.get_mask_uid("pilatus_legacy_image", "frame") == uid
        got = reg.get_mask("pilatus_legacy_image", "frame", version=1).compute()
        np.testing.assert_array_equal(got, mask)
        assert reg.describe(uid).version == 1
        assert reg.describe(uid).legacy is False

    # The registered shape is enforced from now on.
    with pytest.raises(chx_masks.MaskValidationError):
        registry.update_mask("pilatus_legacy_image", "frame", np.ones(shape[::-1], bool))
    new = registry.update_mask("pilatus_legacy_image", "frame", np.zeros(shape, bool))
    assert registry.describe(new).version == 2


def test_update_after_adoption_continues_after_highest_legacy_version(registry):
    masks = {0: random_mask(seed=20), 2: random_mask(seed=22)}
    uids = {
        k: write_legacy(registry, EIGER500K, "gappy", k, m, extra={"sample": "silica"})
        for k, m in masks.items()
    }
    registry.adopt_legacy()

    new_mask = random_mask(seed=23)
    new_uid = registry.update_mask(EIGER500K, "gappy", new_mask)

    assert new_uid not in uids.values()
    record = registry.describe(new_uid)
    assert record.version == 3
    # metadata=None keeps the previous version's metadata (the legacy extras).
    assert record.metadata["sample"] == "silica"
    for reg in (registry, fresh(registry)):
        assert reg.get_mask_uid(EIGER500K, "gappy") == new_uid
        np.testing.assert_array_equal(reg.get_mask(EIGER500K, "gappy").compute(), new_mask)
        history = reg.history(EIGER500K, "gappy")
        assert [(r.version, r.uid) for r in history] == [
            (0, uids[0]),
            (2, uids[2]),
            (3, new_uid),
        ]
        np.testing.assert_array_equal(
            reg.get_mask(EIGER500K, "gappy", version=2).compute(), masks[2]
        )
    # And a further update keeps counting.
    assert registry.describe(registry.update_mask(EIGER500K, "gappy", masks[0])).version == 4


def test_adoption_leaves_registered_masks_alone(registry):
    modern = random_mask(seed=30)
    modern_uid = registry.register_mask(EIGER500K, "modern", modern)
    legacy = random_mask(seed=31)
    legacy_uid = write_legacy(registry, EIGER500K, "old", 0, legacy)

    adopted = registry.adopt_legacy()

    assert [r.uid for r in adopted] == [legacy_uid]
    assert registry.get_masks() == [(EIGER500K, "modern"), (EIGER500K, "old")]
    assert sorted(registry._root["masks"]) == sorted([modern_uid, legacy_uid])
    assert [r.uid for r in registry.history(EIGER500K, "modern")] == [modern_uid]
    np.testing.assert_array_equal(registry.get_mask(EIGER500K, "modern").compute(), modern)
    np.testing.assert_array_equal(registry.get_mask(EIGER500K, "old").compute(), legacy)


def test_legacy_without_version_key_is_version_0(registry):
    """The first CHX layout wrote no "version" at all."""
    mask = random_mask(seed=40)
    uid = str(uuid.uuid4())
    registry._root.write_array(
        mask, key=uid, metadata={"spec": "mask", "name": "ancient", "detector": EIGER500K}
    )
    assert registry.describe(uid).legacy is True
    np.testing.assert_array_equal(registry.get_mask_by_uid(uid).compute(), mask)

    assert [r.uid for r in registry.adopt_legacy()] == [uid]
    assert registry.describe(uid).version == 0
    assert registry.get_mask_uid(EIGER500K, "ancient", version=0) == uid


def test_describe_is_current_in_a_session_opened_before_adoption(registry):
    """A second session (another analysis process) sees the adoption too."""
    mask = random_mask(seed=50)
    uid = write_legacy(registry, EIGER500K, "shared", 0, mask)
    other = fresh(registry)
    assert other.describe(uid).legacy is True

    registry.adopt_legacy()

    # The other session's own history already reports the adopted version ...
    [in_history] = other.history(EIGER500K, "shared")
    assert in_history.uid == uid and in_history.legacy is False
    # ... so describe(uid) must agree with it.
    record = other.describe(uid)
    assert record.legacy is False
    assert record.registered_at == in_history.registered_at


def test_legacy_metadata_the_registry_would_refuse_does_not_half_adopt(registry):
    first = write_legacy(
        registry, EIGER500K, "aaa_first", 0, random_mask(seed=60), extra={"comment": "fine"}
    )
    second = write_legacy(
        registry,
        EIGER500K,
        "zzz_second",
        0,
        random_mask(seed=61),
        extra={"comment": "odd", "created_at": "2022-07-11", "pixel.size_um": 75},
    )
    assert registry.describe(second).metadata["pixel.size_um"] == 75
    before = snapshot(registry)
    try:
        adopted = registry.adopt_legacy()
    except chx_masks.ChxMasksError:
        # README: "Every refused call raises a subclass of ChxMasksError ... and
        # writes nothing" -- so no half-adopted registry.
        assert snapshot(registry) == before
    else:
        assert sorted(r.uid for r in adopted) == sorted([first, second])
        assert registry.get_masks() == [(EIGER500K, "aaa_first"), (EIGER500K, "zzz_second")]
        assert registry.describe(second).metadata["comment"] == "odd"


def test_every_name_listed_after_adoption_resolves(registry):
    masks = {
        name: random_mask(seed=70 + i) for i, name in enumerate(["fine", "jul11/2022", "saxs "])
    }
    uids = {name: write_legacy(registry, EIGER500K, name, 0, m) for name, m in masks.items()}
    try:
        registry.adopt_legacy()
    except chx_masks.ChxMasksError:
        pass  # refusing such names is fine; listing them unreachable is not
    for name, uid in uids.items():  # every legacy uid still reads by uid
        np.testing.assert_array_equal(registry.get_mask_by_uid(uid).compute(), masks[name])
    for detector, name in registry.get_masks():
        uid = registry.get_mask_uid(detector, name)
        assert uid == uids[name]
        np.testing.assert_array_equal(registry.get_mask(detector, name).compute(), masks[name])
        assert [r.uid for r in registry.history(detector, name)] == [uid]
