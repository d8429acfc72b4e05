"""Versions, identity, retirement, composites, detectors, search and integrity."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from helpers import EIGER4M, EIGER500K, SHAPE_500K, ones, random_mask

import chx_masks
from chx_masks import (
    MaskExistsError,
    MaskIntegrityError,
    MaskNotFoundError,
    MaskRegistry,
    mask_sha256,
)


def test_register_starts_version_zero_with_fresh_uid(registry):
    mask = random_mask(seed=1)
    uid = registry.register_mask(EIGER500K, "bs", mask, metadata={"sample": "silica"})
    record = registry.describe(uid)
    assert (record.uid, record.detector, record.name, record.version) == (uid, EIGER500K, "bs", 0)
    assert record.active and record.superseded_at is None and record.retired_at is None
    assert record.sha256 == mask_sha256(mask)
    assert record.masked_pixels == int((~mask).sum())
    assert record.shape == SHAPE_500K
    assert dict(record.metadata) == {"sample": "silica"}
    assert abs(record.registered_at - datetime.now(timezone.utc)) < timedelta(minutes=1)


def test_second_register_refused_and_writes_nothing(registry):
    uid = registry.register_mask(EIGER500K, "bs", ones())
    masks_before = sorted(registry._root["masks"])
    with pytest.raises(MaskExistsError, match="update_mask"):
        registry.register_mask(EIGER500K, "bs", random_mask())
    assert sorted(registry._root["masks"]) == masks_before
    assert [r.uid for r in registry.history(EIGER500K, "bs")] == [uid]


def test_update_adds_next_version_and_keeps_old_ones(registry):
    v0, v1, v2 = (random_mask(seed=s) for s in range(3))
    uid0 = registry.register_mask(EIGER500K, "bs", v0, metadata={"sample": "a"})
    uid1 = registry.update_mask(EIGER500K, "bs", v1)
    uid2 = registry.update_mask(EIGER500K, "bs", v2, metadata={"sample": "b"})
    assert len({uid0, uid1, uid2}) == 3
    assert registry.get_mask_uid(EIGER500K, "bs") == uid2
    for version, (uid, mask) in enumerate([(uid0, v0), (uid1, v1), (uid2, v2)]):
        assert registry.get_mask_uid(EIGER500K, "bs", version=version) == uid
        np.testing.assert_array_equal(
            registry.get_mask(EIGER500K, "bs", version=version).compute(), mask
        )
    # metadata=None keeps the previous version's; an explicit dict replaces it.
    assert dict(registry.describe(uid1).metadata) == {"sample": "a"}
    assert dict(registry.describe(uid2).metadata) == {"sample": "b"}
    history = registry.history(EIGER500K, "bs")
    assert [(r.version, r.active) for r in history] == [(0, False), (1, False), (2, True)]
    assert history[0].superseded_at == history[1].registered_at
    assert history[1].superseded_at == history[2].registered_at


def test_as_of_is_half_open(registry):
    uid0 = registry.register_mask(EIGER500K, "bs", random_mask(seed=0))
    time.sleep(0.01)
    uid1 = registry.update_mask(EIGER500K, "bs", random_mask(seed=1))
    r0, r1 = registry.history(EIGER500K, "bs")
    assert registry.get_mask_uid(EIGER500K, "bs", as_of=r0.registered_at) == uid0
    assert registry.get_mask_uid(EIGER500K, "bs", as_of=r1.registered_at) == uid1
    just_before = r1.registered_at - timedelta(microseconds=1)
    assert registry.get_mask_uid(EIGER500K, "bs", as_of=just_before) == uid0
    # ISO strings and POSIX seconds are accepted too.
    assert registry.get_mask_uid(EIGER500K, "bs", as_of=just_before.isoformat()) == uid0
    assert registry.get_mask_uid(EIGER500K, "bs", as_of=time.time() + 60) == uid1
    np.testing.assert_array_equal(
        registry.get_mask(EIGER500K, "bs", as_of=just_before).compute(), random_mask(seed=0)
    )
    with pytest.raises(MaskNotFoundError, match="did not exist"):
        registry.get_mask_uid(EIGER500K, "bs", as_of=r0.registered_at - timedelta(seconds=1))


def test_delete_retires_lineage_but_uids_stay_readable(registry):
    mask = random_mask(seed=4)
    uid0 = registry.register_mask(EIGER500K, "bs", mask)
    uid1 = registry.update_mask(EIGER500K, "bs", ones())
    registry.register_mask(EIGER500K, "other", ones())
    retired = registry.delete_mask(EIGER500K, "bs")
    assert retired.uid == uid1 and retired.retired_at is not None and not retired.active

    assert registry.get_masks() == [(EIGER500K, "other")]
    assert (EIGER500K, "bs") in registry.get_masks(include_retired=True)
    with pytest.raises(MaskNotFoundError, match="retired"):
        registry.get_mask(EIGER500K, "bs")
    with pytest.raises(KeyError):  # builtin-compatible
        registry.get_mask_uid(EIGER500K, "bs")
    np.testing.assert_array_equal(registry.get_mask_by_uid(uid0).compute(), mask)
    assert registry.describe(uid1).retired_at == retired.retired_at
    # The time when it was active still resolves (runs recorded then replay).
    assert registry.get_mask_uid(EIGER500K, "bs", as_of=retired.registered_at) == uid1
    with pytest.raises(MaskNotFoundError, match="retired"):
        registry.get_mask_uid(EIGER500K, "bs", as_of=retired.retired_at)
    assert registry.search(name="bs") == []
    assert {r.uid for r in registry.search(name="bs", include_retired=True)} == {uid1}


def test_register_after_retire_continues_numbering(registry):
    uid0 = registry.register_mask(EIGER500K, "bs", ones())
    registry.delete_mask(EIGER500K, "bs")
    uid_new = registry.register_mask(EIGER500K, "bs", random_mask())
    new = registry.describe(uid_new)
    assert new.version == 2  # version 1 is the retirement; no number is reused
    assert registry.get_mask_uid(EIGER500K, "bs") == uid_new
    assert [r.uid for r in registry.history(EIGER500K, "bs")] == [uid0, uid_new]
    with pytest.raises(MaskNotFoundError, match="retirement"):
        registry.get_mask_uid(EIGER500K, "bs", version=1)
    assert registry.get_mask_uid(EIGER500K, "bs", version=0) == uid0


def test_delete_twice_refused(registry):
    registry.register_mask(EIGER500K, "bs", ones())
    registry.delete_mask(EIGER500K, "bs")
    with pytest.raises(MaskNotFoundError):
        registry.delete_mask(EIGER500K, "bs")
    assert len(list(registry._root["detectors"][EIGER500K])) == 2


def test_get_masks_lists_in_registration_order_across_detectors(registry):
    registry.register_mask(EIGER500K, "b", ones())
    registry.register_mask(EIGER500K, "a", ones())
    registry.register_mask(EIGER4M, "chip_mask", np.ones((2167, 2070), bool))
    registry.update_mask(EIGER500K, "b", random_mask(seed=9))  # an update does not reorder
    assert registry.get_masks() == [(EIGER500K, "b"), (EIGER500K, "a"), (EIGER4M, "chip_mask")]
    assert registry.get_masks(EIGER4M) == [(EIGER4M, "chip_mask")]


def test_resolve_composite_and_explain(registry):
    a = ones()
    a[0, :] = False  # 1030 pixels
    b = ones()
    b[:, 0] = False  # 514 pixels, one shared with a
    c = ones()
    c[0, 0] = False  # entirely inside a and b
    uids = [registry.register_mask(EIGER500K, n, m) for n, m in zip("abc", (a, b, c), strict=True)]
    registry.update_mask(EIGER500K, "c", c, force=True)
    comp = registry.resolve_composite(EIGER500K, ["a", "b", "c"])
    assert comp.names == ("a", "b", "c")
    assert comp.uids[:2] == tuple(uids[:2]) and comp.uids[2] != uids[2]
    assert comp.versions == (0, 0, 1)
    np.testing.assert_array_equal(comp.mask, a & b & c)
    assert comp.sha256 == mask_sha256(a & b & c)
    assert not comp.mask.flags.writeable
    with pytest.raises(AttributeError):
        comp.uids = ()  # frozen
    explained = comp.explain()
    rows = {r.name: (r.masked_pixels, r.only_masked_pixels) for r in explained.components}
    assert rows == {"a": (1030, 1029), "b": (514, 513), "c": (1, 0)}
    assert explained.masked_pixels == 1030 + 514 - 1
    assert "only it" in str(explained) and "1,029" in str(explained)
    assert comp.provenance() == {
        "names": ["a", "b", "c"],
        "uids": list(comp.uids),
        "versions": [0, 0, 1],
        "sha256": comp.sha256,
    }
    lazy = registry.get_composite_mask(EIGER500K, ["a", "b", "c"])
    np.testing.assert_array_equal(lazy.compute(), comp.mask)


def test_resolve_composite_as_of(registry):
    first = random_mask(seed=10)
    registry.register_mask(EIGER500K, "a", first)
    registry.register_mask(EIGER500K, "b", ones())
    moment = datetime.now(timezone.utc)
    time.sleep(0.01)
    registry.update_mask(EIGER500K, "a", ones())
    then = registry.resolve_composite(EIGER500K, ["a", "b"], as_of=moment)
    assert then.versions == (0, 0) and then.as_of == moment
    np.testing.assert_array_equal(then.mask, first)
    assert registry.resolve_composite(EIGER500K, ["a", "b"]).versions == (1, 0)


def test_detectors_builtin_and_registered(registry):
    names = {d.name: d.shape for d in registry.detectors()}
    assert names == {
        "eiger4m_single_image": (2167, 2070),
        "eiger1m_single_image": (1065, 1030),
        "eiger500K_single_image": (514, 1030),
    }
    record = registry.register_detector("pilatus_image", (5, 7), metadata={"vendor": "Dectris"})
    assert record.shape == (5, 7) and record.metadata["vendor"] == "Dectris"
    assert not record.builtin
    assert registry.register_detector("pilatus_image", [5, 7]).shape == (5, 7)  # idempotent
    with pytest.raises(MaskExistsError, match="5x7"):
        registry.register_detector("pilatus_image", (7, 5))
    assert registry.get_detector("pilatus_image").shape == (5, 7)
    mask = np.ones((5, 7), bool)
    mask[2, 3] = False
    uid = registry.register_mask("pilatus_image", "center", mask)
    np.testing.assert_array_equal(registry.get_mask_by_uid(uid).compute(), mask)
    with pytest.raises(chx_masks.MaskValidationError, match="7x5"):
        registry.register_mask("pilatus_image", "t", mask.T)


def test_search_by_detector_name_and_metadata(registry):
    u1 = registry.register_mask(EIGER500K, "m1", ones(), metadata={"sample": {"name": "silica"}})
    u2 = registry.register_mask(EIGER500K, "m2", ones(), metadata={"beamtime": "2026-3"})
    registry.register_detector("small_image", (3, 3))
    u3 = registry.register_mask(
        "small_image", "m1", np.ones((3, 3), bool), metadata={"beamtime": "2026-3"}
    )
    assert {r.uid for r in registry.search(metadata={"beamtime": "2026-3"})} == {u2, u3}
    assert [r.uid for r in registry.search(metadata={"sample.name": "silica"})] == [u1]
    assert {r.uid for r in registry.search(name="m1")} == {u1, u3}
    assert [r.uid for r in registry.search(detector="small_image")] == [u3]
    assert registry.search(metadata={"beamtime": "1999-1"}) == []
    u2b = registry.update_mask(EIGER500K, "m2", random_mask(seed=8))
    assert [r.uid for r in registry.search(name="m2")] == [u2b]
    assert [r.uid for r in registry.search(name="m2", all_versions=True)] == [u2, u2b]


def test_lazy_read_defers_io_until_compute(registry):
    uid = registry.register_mask(EIGER500K, "m", random_mask(seed=3))
    fresh = MaskRegistry(registry._root)  # same store, empty caches
    lazy = fresh.get_mask(EIGER500K, "m")
    assert uid not in fresh._arrays
    lazy.compute()
    assert uid in fresh._arrays


def test_returned_arrays_are_independent_copies(registry):
    registry.register_mask(EIGER500K, "m", ones())
    got = registry.get_mask(EIGER500K, "m").compute()
    got[:] = False
    np.testing.assert_array_equal(registry.get_mask(EIGER500K, "m").compute(), ones())


def _chunk_file(embedded_dir, uid):
    chunks = [
        p
        for p in (embedded_dir / "data").rglob("*")
        if p.is_file() and uid in str(p) and p.name != "zarr.json"
    ]
    assert len(chunks) == 1, chunks
    return chunks[0]


def test_changed_bytes_on_disk_raise_integrity_error(embedded_dir):
    import zarr

    with MaskRegistry.embedded(embedded_dir) as reg:
        uid = reg.register_mask(EIGER500K, "m", ones())
    array_dir = _chunk_file(embedded_dir, uid).parents[2]
    stored = zarr.open_array(str(array_dir), mode="r+")
    stored[10, 10] = False  # valid encoding, different content
    with MaskRegistry.embedded(embedded_dir) as reg:
        with pytest.raises(MaskIntegrityError, match="integrity"):
            reg.get_mask_by_uid(uid).compute()
        with pytest.raises(MaskIntegrityError):
            reg.resolve_composite(EIGER500K, ["m"])


def test_garbage_bytes_on_disk_raise_integrity_error(embedded_dir):
    with MaskRegistry.embedded(embedded_dir) as reg:
        uid = reg.register_mask(EIGER500K, "m", ones())
    _chunk_file(embedded_dir, uid).write_bytes(b"not zstd at all")
    with MaskRegistry.embedded(embedded_dir) as reg:
        with pytest.raises(MaskIntegrityError, match="damaged"):
            reg.get_mask(EIGER500K, "m").compute()


def test_embedded_registry_persists_across_opens(embedded_dir):
    mask = random_mask(seed=5)
    with MaskRegistry.embedded(embedded_dir) as reg:
        uid = reg.register_mask(EIGER500K, "m", mask, metadata={"k": [1, 2]})
    with MaskRegistry.embedded(embedded_dir) as reg:
        assert reg.get_mask_uid(EIGER500K, "m") == uid
        np.testing.assert_array_equal(reg.get_mask_by_uid(uid).compute(), mask)
        assert dict(reg.describe(uid).metadata) == {"k": [1, 2]}


def test_uids_are_uuid4_and_never_reused(registry):
    seen = set()
    for i in range(5):
        uid = registry.register_mask(EIGER500K, f"m{i}", ones())
        assert uuid.UUID(uid).version == 4
        seen.add(uid)
        registry.delete_mask(EIGER500K, f"m{i}")
        seen.add(registry.register_mask(EIGER500K, f"m{i}", ones()))
    assert len(seen) == 10


def test_unreachable_server_is_registry_unavailable():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(chx_masks.RegistryUnavailableError, match=f"127.0.0.1:{port}"):
        MaskRegistry.from_uri(f"http://127.0.0.1:{port}/api/v1?api_key=secret", timeout=2)


def test_api_key_never_in_repr_or_location(tiled_server, server_registry_uri, tmp_path):
    reg = MaskRegistry.from_uri(
        server_registry_uri + f"?api_key={tiled_server.api_key}", disk_cache=tmp_path / "copies"
    )
    try:
        assert tiled_server.api_key not in repr(reg)
        assert tiled_server.api_key not in reg.location
        uid = reg.register_mask(EIGER500K, "keyed", random_mask(seed=3))
    finally:
        reg.close()
    # A new reader keeps a local copy of what it read where it was told to.
    with MaskRegistry.from_uri(
        server_registry_uri, api_key=tiled_server.api_key, disk_cache=tmp_path / "copies"
    ) as reader:
        reader.get_mask_by_uid(uid).compute()
    assert (tmp_path / "copies" / f"{uid}.npy").is_file()


def test_local_copies_spare_a_new_process_the_read_and_are_verified(embedded_dir, tmp_path):
    import zarr

    cache = tmp_path / "cache"
    mask = random_mask(seed=8)
    with MaskRegistry.embedded(embedded_dir) as reg:
        uid = reg.register_mask(EIGER500K, "m", mask)
    with MaskRegistry.embedded(embedded_dir, disk_cache=False) as none:
        np.testing.assert_array_equal(none.get_mask_by_uid(uid).compute(), mask)
    assert not cache.exists()
    with MaskRegistry.embedded(embedded_dir, disk_cache=cache) as reg:
        np.testing.assert_array_equal(reg.get_mask_by_uid(uid).compute(), mask)
    copy = cache / f"{uid}.npy"
    assert copy.is_file() and not [p for p in cache.iterdir() if p.name.startswith(".")]
    np.testing.assert_array_equal(np.load(copy), mask)

    # The registry's own bytes change: a new reader with the verified local
    # copy still gives the registered mask; one without it refuses.
    array_dir = _chunk_file(embedded_dir, uid).parents[2]
    stored = zarr.open_array(str(array_dir), mode="r+")
    stored[0, 0] = not mask[0, 0]
    opened = MaskRegistry.embedded(embedded_dir)
    try:
        cached = MaskRegistry(opened._root, disk_cache=cache)
        np.testing.assert_array_equal(cached.get_mask_by_uid(uid).compute(), mask)
        uncached = MaskRegistry(opened._root, disk_cache=False)
        with pytest.raises(MaskIntegrityError, match="integrity"):
            uncached.get_mask_by_uid(uid).compute()
        # A damaged local copy is not used: the read goes to the registry,
        # whose changed bytes are then refused.
        np.save(copy, ~mask)
        with pytest.raises(MaskIntegrityError, match="integrity"):
            MaskRegistry(opened._root, disk_cache=cache).get_mask_by_uid(uid).compute()
    finally:
        opened.close()


# ------------------------------------------ safe deletes, repeats, identities


def test_deleting_an_active_name_is_refused_and_writes_nothing(registry):
    registry.register_mask(EIGER500K, "gaps", random_mask(seed=1))
    uid = registry.register_mask(EIGER500K, "bs", random_mask(seed=2))
    registry.activate(EIGER500K, ["gaps", "bs"], note="sample B")
    before = registry.active_history(EIGER500K), registry.history(EIGER500K, "bs")
    with pytest.raises(chx_masks.MaskInUseError) as caught:
        registry.delete_mask(EIGER500K, "bs")
    message = str(caught.value)
    assert "active set of eiger500K_single_image (v0: gaps, bs)" in message
    assert "activate('eiger500K_single_image', ['gaps'])" in message and "force=True" in message
    assert "chx-masks activate eiger500K_single_image gaps" in caught.value.cli_message
    assert "--force" in caught.value.cli_message
    assert (registry.active_history(EIGER500K), registry.history(EIGER500K, "bs")) == before
    assert registry.get_mask_uid(EIGER500K, "bs") == uid


def test_forced_delete_takes_the_name_out_of_the_active_set_first(registry):
    registry.register_mask(EIGER500K, "gaps", random_mask(seed=1))
    uid = registry.register_mask(EIGER500K, "bs", random_mask(seed=2))
    registry.activate(EIGER500K, ["gaps", "bs"])
    last = registry.delete_mask(EIGER500K, "bs", force=True)
    assert last.uid == uid and last.retired_at is not None
    active = registry.active_set(EIGER500K)
    assert (active.names, active.version) == (("gaps",), 1)
    assert "bs removed" in active.note
    # The next run start resolves the active set; the old uid still reads.
    assert registry.resolve_composite(EIGER500K, list(active.names)).names == ("gaps",)
    assert registry.describe(uid).retired_at == last.retired_at
    # A name no active set uses is retired without force.
    registry.register_mask(EIGER500K, "spare", random_mask(seed=3))
    assert registry.delete_mask(EIGER500K, "spare").retired_at is not None
    assert registry.active_set(EIGER500K).version == 1


def test_missing_names_are_the_unregistered_and_the_retired(registry):
    registry.register_mask(EIGER500K, "gaps", ones())
    registry.register_mask(EIGER500K, "old", random_mask(seed=4))
    registry.delete_mask(EIGER500K, "old")
    assert registry.missing_names(EIGER500K, ["gaps", "old", "never"]) == ("old", "never")
    assert registry.missing_names(EIGER500K, []) == ()


def test_an_identical_next_version_is_refused_unless_forced(registry):
    mask = random_mask(seed=5)
    uid0 = registry.register_mask(EIGER500K, "bs", mask)
    before = sorted(registry._root["masks"])
    with pytest.raises(MaskExistsError, match="already holds exactly this mask") as caught:
        registry.update_mask(EIGER500K, "bs", mask.copy(), metadata={"note": "same"})
    assert "force=True" in str(caught.value) and "--force" in caught.value.cli_message
    assert sorted(registry._root["masks"]) == before
    assert [r.uid for r in registry.history(EIGER500K, "bs")] == [uid0]
    uid1 = registry.update_mask(EIGER500K, "bs", mask, force=True)
    assert [r.version for r in registry.history(EIGER500K, "bs")] == [0, 1]
    assert registry.describe(uid1).sha256 == registry.describe(uid0).sha256


def test_a_unique_uid_prefix_resolves_wherever_a_uid_does(registry):
    mask = random_mask(seed=6)
    uid = registry.register_mask(EIGER500K, "bs", mask)
    for prefix in (uid[:8], uid[:13], uid[:8].upper()):
        assert registry.describe(prefix).uid == uid
    np.testing.assert_array_equal(registry.get_mask_by_uid(uid[:8]).compute(), mask)
    assert registry.composite_from_uids([uid[:8]]).uids == (uid,)
    with pytest.raises(MaskNotFoundError, match="No mask uid starts with"):
        registry.describe("00000000" if not uid.startswith("00000000") else "ffffffff")
    with pytest.raises(MaskNotFoundError, match="is not a mask uid"):
        registry.describe(uid[:7])


def test_an_ambiguous_uid_prefix_lists_the_candidates(registry):
    # 17 uids: two share their first hex digit (pigeonhole), so that digit is
    # an ambiguous prefix; the registry's prefix query must list both.
    uids = [registry.register_mask(EIGER500K, f"m{i}", random_mask(seed=10 + i)) for i in range(17)]
    by_first: dict[str, list[str]] = {}
    for uid in uids:
        by_first.setdefault(uid[:1], []).append(uid)
    shared = next(group for group in by_first.values() if len(group) > 1)
    with pytest.raises(MaskNotFoundError, match="is ambiguous") as caught:
        registry._uid_from_prefix(shared[0][:1])
    assert all(u in str(caught.value) for u in shared[:4])


def test_each_version_and_active_set_records_who_made_it(registry):
    import getpass

    uid = registry.register_mask(EIGER500K, "bs", random_mask(seed=7))
    registry.activate(EIGER500K, ["bs"])
    import socket

    who = registry.identity
    local = f"{getpass.getuser()}@{socket.gethostname()}"
    if registry.location.startswith("http"):  # a single-user key names nobody
        assert who == f"{local} (single-user API key)"
    else:
        assert who == local
    assert registry.describe(uid).created_by == who
    assert [r.created_by for r in registry.history(EIGER500K, "bs")] == [who]
    assert registry.active_set(EIGER500K).created_by == who


def test_an_unknown_detector_suggests_the_close_name_and_the_command(registry):
    with pytest.raises(chx_masks.DetectorNotFoundError) as caught:
        registry.get_mask_uid("eiger4m", "bs")
    assert "Did you mean 'eiger4m_single_image'?" in str(caught.value)
    assert "register_detector('eiger4m', shape=(rows, cols))" in str(caught.value)
    assert "`chx-masks detector add eiger4m ROWS COLS`" in caught.value.cli_message
