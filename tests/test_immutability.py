"""A registered version never changes: every public write path leaves an existing uid as it was.

One mask (with metadata) is registered on an embedded registry. Its fingerprint
is taken: the sha256 of every file of its array under ``data/masks/<uid>/``,
the ``mask_sha256`` of the array a fresh, cache-free registry reads back, the
raw bytes tiled serves for the node, the node's metadata, its immutable record
fields (uid, detector, name, version, registered_at, sha256, shape,
masked_pixels, metadata) and the slot that names it. Then every public write
path is tried against its lineage: the registry's methods, the module-level
functions, the ``chx_masks.io`` and ``chx_masks.generate`` helpers, legacy
adoption and every writing ``chx-masks`` command. Each step asserts its own
outcome (refused, or a new uid with the next version) and then that the
fingerprint is exactly as before.

The outer defence: bytes changed under the registry, through the raw tiled
client or on disk, make a later read raise ``MaskIntegrityError`` instead of
serving them.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import EIGER500K, SHAPE_500K, SUMMARY, random_mask

import chx_masks
from chx_masks import (
    MaskExistsError,
    MaskIntegrityError,
    MaskNotFoundError,
    MaskRegistry,
    mask_sha256,
)
from chx_masks import generate as gen
from chx_masks._cli import main
from chx_masks.io import ingest_master_file, register_from_file, write_mask

DET = EIGER500K
NAME = "gaps"
METADATA = {"sample": "silica", "beamtime": "2026-3", "roi": {"rows": [10, 20], "ok": True}}
IMMUTABLE_FIELDS = (
    "uid",
    "detector",
    "name",
    "version",
    "registered_at",
    "sha256",
    "shape",
    "masked_pixels",
    "metadata",
)


@dataclass
class World:
    """The registry, the original version's uid and array, and a scratch directory."""

    registry: MaskRegistry
    directory: Path
    scratch: Path
    uid: str
    original: np.ndarray

    def other(self, seed: int) -> np.ndarray:
        """A mask of the detector's shape that differs from the original."""
        return random_mask(seed=seed)

    def npy(self, name: str, mask: np.ndarray) -> Path:
        path = self.scratch / name
        np.save(path, mask)
        return path


def _digest(data: bytes | np.ndarray) -> str:
    if isinstance(data, np.ndarray):
        head = f"{data.dtype.str}{data.shape}".encode()
        return hashlib.sha256(head + np.ascontiguousarray(data).tobytes()).hexdigest()
    return hashlib.sha256(data).hexdigest()


def _as_plain(value: Any) -> Any:
    """Metadata as plain JSON values, so a mapping view compares by content."""
    return json.loads(json.dumps(value, default=dict))


def fingerprint(world: World) -> dict[str, Any]:
    """Everything about the original version that must never change."""
    uid = world.uid
    folder = world.directory / "data" / "masks" / uid
    files = {
        str(path.relative_to(folder)): _digest(path.read_bytes())
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    assert files, f"no array files for {uid} under {folder}"
    # A fresh registry on the same client: no array, record or disk cache.
    fresh = MaskRegistry(world.registry._root, disk_cache=False)
    try:
        array_sha256 = mask_sha256(fresh.get_mask_by_uid(uid).compute())
        record = fresh.describe(uid)
        fields = _as_plain(
            {
                f: str(getattr(record, f)) if f == "registered_at" else getattr(record, f)
                for f in IMMUTABLE_FIELDS
            }
        )
    except MaskIntegrityError as err:  # what a changed record gets
        array_sha256 = fields = f"refused: {type(err).__name__}"
    # One request each: a path, not a walk from the root.
    node = world.registry._root[f"masks/{uid}"]
    slot = world.registry._root[f"detectors/{DET}/{NAME}@0"]
    return {
        "files": files,
        "mask_sha256": array_sha256,
        "raw": _digest(np.asarray(node.read())),
        "record": fields,
        "node_metadata": _as_plain(dict(node.metadata)),
        "slot": _as_plain(dict(slot.metadata)),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    top = tmp_path_factory.mktemp("immutability")
    registry = MaskRegistry.embedded(top / "registry", disk_cache=False)
    original = random_mask(seed=100)
    uid = registry.register_mask(DET, NAME, original, metadata=METADATA)
    (top / "scratch").mkdir()
    yield World(registry, top / "registry", top / "scratch", uid, original)
    registry.close()


# ----------------------------------------------------------------- write paths


def _versions(world: World) -> list[tuple[int, str]]:
    return [(r.version, r.uid) for r in world.registry.history(DET, NAME)]


def _new_version(world: World, uid: str) -> None:
    """``uid`` is a new version of the lineage: not the original, the newest number."""
    assert uid != world.uid
    record = world.registry.describe(uid)
    assert (record.detector, record.name) == (DET, NAME)
    assert record.version == max(v for v, _ in _versions(world))


def _cli(world: World, *args: str, code: int = 0, input: str | None = None) -> str:
    result = CliRunner().invoke(main, ["--dir", str(world.directory), *args], input=input)
    assert result.exit_code == code, result.output
    return result.stdout


def api_register_same_name(w: World) -> None:
    with pytest.raises(MaskExistsError, match=w.uid):
        w.registry.register_mask(DET, NAME, w.other(1))


def api_register_same_name_same_bytes(w: World) -> None:
    with pytest.raises(MaskExistsError):
        w.registry.register_mask(DET, NAME, w.original.copy(), metadata=METADATA)


def api_update(w: World) -> None:
    _new_version(w, w.registry.update_mask(DET, NAME, w.other(2), metadata={"sample": "new"}))
    assert w.registry.describe(w.uid).superseded_at is not None


def api_update_same_bytes_keeps_metadata(w: World) -> None:
    uid = w.registry.update_mask(DET, NAME, w.original.copy(), force=True)
    _new_version(w, uid)
    record = w.registry.describe(uid)
    assert record.sha256 == mask_sha256(w.original) and record.metadata == {"sample": "new"}


def api_register_detector_same_shape(w: World) -> None:
    assert w.registry.register_detector(DET, SHAPE_500K).shape == SHAPE_500K


def api_register_detector_other_shape(w: World) -> None:
    with pytest.raises(MaskExistsError):
        w.registry.register_detector(DET, SHAPE_500K[::-1])


def api_activate(w: World) -> None:
    assert w.registry.activate(DET, [NAME], note="immutability").names == (NAME,)


def api_deactivate(w: World) -> None:
    assert w.registry.deactivate(DET).names == ()


def module_register_same_name(w: World) -> None:
    chx_masks.set_default_registry(w.registry)
    try:
        with pytest.raises(MaskExistsError):
            chx_masks.register_mask(DET, NAME, w.other(3))
    finally:
        chx_masks.set_default_registry(None)


def api_delete(w: World) -> None:
    last = w.registry.delete_mask(DET, NAME)
    assert last.retired_at is not None and (DET, NAME) not in w.registry.get_masks()


def api_update_after_retire(w: World) -> None:
    with pytest.raises(MaskNotFoundError, match="retired"):
        w.registry.update_mask(DET, NAME, w.other(4))


def api_delete_after_retire(w: World) -> None:
    with pytest.raises(MaskNotFoundError, match="retired"):
        w.registry.delete_mask(DET, NAME)


def api_register_after_retire(w: World) -> None:
    uid = w.registry.register_mask(DET, NAME, w.original.copy(), metadata=METADATA)
    _new_version(w, uid)
    assert w.registry.describe(uid).version > 0  # numbers are never reused


def module_delete_and_register_again(w: World) -> None:
    chx_masks.set_default_registry(w.registry)
    try:
        chx_masks.delete_mask(DET, NAME)
        uid = chx_masks.register_mask(DET, NAME, w.other(5))
    finally:
        chx_masks.set_default_registry(None)
    _new_version(w, uid)


def adopt_legacy_claiming_version_0(w: World) -> None:
    """A legacy node (older flat layout) that says it is this lineage's version 0."""
    import uuid

    key = str(uuid.uuid4())
    w.registry._root.write_array(
        w.other(6),
        key=key,
        metadata={"spec": "mask", "name": NAME, "detector": DET, "version": 0},
    )
    assert key not in {r.uid for r in w.registry.adopt_legacy()}
    assert w.registry.get_mask_uid(DET, NAME, version=0) == w.uid


def adopt_legacy_keyed_by_the_uid(w: World) -> None:
    """A legacy node at the container's top, keyed by the original uid itself."""
    w.registry._root.write_array(
        w.other(7),
        key=w.uid,
        metadata={"spec": "mask", "name": NAME, "detector": DET, "version": 99},
    )
    assert w.uid not in {r.uid for r in w.registry.adopt_legacy()}


def io_register_from_file_same_name(w: World) -> None:
    with pytest.raises(MaskExistsError):
        register_from_file(w.registry, DET, NAME, w.npy("io.npy", w.other(8)))


def io_register_from_file_update(w: World) -> None:
    _new_version(
        w, register_from_file(w.registry, DET, NAME, w.npy("io2.npy", w.other(9)), update=True)
    )


def io_ingest_master_file_same_content(w: World) -> None:
    current = w.registry.get_mask_uid(DET, NAME)
    master = write_mask(w.registry.get_mask(DET, NAME).compute(), w.scratch / "same_master.h5")
    assert ingest_master_file(w.registry, DET, NAME, master) == (current, False)


def io_ingest_master_file_new_content(w: World) -> None:
    master = write_mask(w.other(10), w.scratch / "new_master.h5")
    uid, created = ingest_master_file(w.registry, DET, NAME, master)
    assert created
    _new_version(w, uid)


def generate_register_same_name(w: World) -> None:
    with pytest.raises(MaskExistsError):
        gen.circle(SHAPE_500K, (100, 100), 10).register(w.registry, DET, NAME)


def generate_register_update(w: World) -> None:
    _new_version(
        w, gen.circle(SHAPE_500K, (200, 300), 12).register(w.registry, DET, NAME, update=True)
    )


def cli_register_same_name(w: World) -> None:
    result = CliRunner().invoke(
        main, ["--dir", str(w.directory), "register", DET, NAME, str(w.npy("cli.npy", w.other(11)))]
    )
    assert result.exit_code == 1 and "already registered" in result.stderr, result.output


def cli_update(w: World) -> None:
    _cli(w, "update", DET, NAME, str(w.npy("cli2.npy", w.other(12))), "-m", "sample=cli")
    _new_version(w, w.registry.get_mask_uid(DET, NAME))


def cli_import_skips_existing(w: World) -> None:
    rows = json.loads(_cli(w, "import", DET, str(w.npy(f"{NAME}.npy", w.other(13))), "--json"))
    assert [r["outcome"] for r in rows] == ["skipped"]


def cli_import_update(w: World) -> None:
    rows = json.loads(
        _cli(w, "import", DET, str(w.npy(f"{NAME}.npy", w.other(14))), "--update", "--json")
    )
    assert [r["outcome"] for r in rows] == ["updated"]
    _new_version(w, rows[0]["uid"])


def cli_generate_same_name(w: World) -> None:
    _cli(w, "generate", "circle", DET, NAME, "--center", "50", "60", "--radius", "5", code=1)


def cli_generate_dry_run_update(w: World) -> None:
    before = _versions(w)
    _cli(
        w,
        "generate",
        "rectangle",
        DET,
        NAME,
        "--top-left",
        "0",
        "0",
        "--bottom-right",
        "9",
        "9",
        "--update",
        "--dry-run",
    )
    assert _versions(w) == before


def cli_generate_update(w: World) -> None:
    _cli(w, "generate", "circle", DET, NAME, "--center", "50", "60", "--radius", "5", "--update")
    _new_version(w, w.registry.get_mask_uid(DET, NAME))


def cli_activate(w: World) -> None:
    _cli(w, "activate", DET, NAME, "--note", "from the command line")
    assert w.registry.active_set(DET).names == (NAME,)


def cli_activate_none(w: World) -> None:
    _cli(w, "activate", DET, "--none")
    assert w.registry.active_set(DET).names == ()


def cli_composite_with_picture(w: World) -> None:
    before = _versions(w)
    _cli(w, "composite", DET, NAME, "--png", str(w.scratch / "composite.png"))
    assert _versions(w) == before


def cli_export(w: World) -> None:
    _cli(w, "export", DET, NAME, str(w.scratch / "export.edf"), "--uid", w.uid)
    from chx_masks.io import read_mask

    np.testing.assert_array_equal(read_mask(w.scratch / "export.edf")[0], w.original)


def cli_delete_declined(w: World) -> None:
    before = _versions(w)
    _cli(w, "delete", DET, NAME, input="n\n", code=1)
    assert _versions(w) == before


def cli_delete(w: World) -> None:
    _cli(w, "delete", DET, NAME, "--yes")
    assert (DET, NAME) not in w.registry.get_masks()


def cli_register_after_retire(w: World) -> None:
    _cli(w, "register", DET, NAME, str(w.npy("again.npy", w.original)))
    _new_version(w, w.registry.get_mask_uid(DET, NAME))


WRITE_PATHS: list[tuple[str, Callable[[World], None]]] = [
    (func.__name__, func)
    for func in (
        api_register_same_name,
        api_register_same_name_same_bytes,
        api_update,
        api_update_same_bytes_keeps_metadata,
        api_register_detector_same_shape,
        api_register_detector_other_shape,
        api_activate,
        api_deactivate,
        module_register_same_name,
        api_delete,
        api_update_after_retire,
        api_delete_after_retire,
        api_register_after_retire,
        module_delete_and_register_again,
        adopt_legacy_claiming_version_0,
        adopt_legacy_keyed_by_the_uid,
        io_register_from_file_same_name,
        io_register_from_file_update,
        io_ingest_master_file_same_content,
        io_ingest_master_file_new_content,
        generate_register_same_name,
        generate_register_update,
        cli_register_same_name,
        cli_update,
        cli_import_skips_existing,
        cli_import_update,
        cli_generate_same_name,
        cli_generate_dry_run_update,
        cli_generate_update,
        cli_activate,
        cli_activate_none,
        cli_composite_with_picture,
        cli_export,
        cli_delete_declined,
        cli_delete,
        cli_register_after_retire,
    )
]


@pytest.fixture(scope="module", autouse=True)
def _print_counts() -> None:
    """How many write paths were tried, in pytest's terminal summary."""
    kinds = Counter(label.split("_", 1)[0] for label, _ in WRITE_PATHS)
    SUMMARY.setdefault("test_immutability: write paths tried", {})[
        f"{len(WRITE_PATHS)} write paths"
    ] = ", ".join(f"{kind} {count}" for kind, count in kinds.items())


def test_every_write_path_leaves_the_original_version_unchanged(world: World) -> None:
    """The steps run in order on one registry; each failing one is reported by name."""
    original = fingerprint(world)
    assert original["mask_sha256"] == mask_sha256(world.original)
    assert original["record"]["metadata"] == METADATA
    assert original["record"]["version"] == 0
    failures = []
    for label, step in WRITE_PATHS:
        try:
            step(world)
        except Exception as exc:  # the step's own outcome was wrong
            failures.append(f"[{label}] {type(exc).__name__}: {exc}")
        now = fingerprint(world)
        changed = sorted(k for k in original if now[k] != original[k])
        if changed:
            failures.append(f"[{label}] changed the original version: {changed}")
            original = now  # judge the next step on its own
    assert not failures, "\n".join(failures)
    versions = [v for v, _ in _versions(world)]
    assert versions[0] == 0 and _versions(world)[0][1] == world.uid
    assert versions == sorted(set(versions)), versions  # no version number twice


# ------------------------------------------------------------------ outer defence


Stored = tuple[MaskRegistry, str, np.ndarray]


@pytest.fixture
def stored(embedded_dir: Path) -> Iterator[Stored]:
    """A registry with one registered mask: (registry, uid, the mask)."""
    registry = MaskRegistry.embedded(embedded_dir, disk_cache=False)
    mask = random_mask(seed=200)
    uid = registry.register_mask(DET, NAME, mask, metadata=METADATA)
    yield registry, uid, mask
    registry.close()


def _altered(mask: np.ndarray) -> np.ndarray:
    changed = mask.copy()
    changed[0, 0] = not changed[0, 0]
    return changed


def _refuses_to_serve(registry: MaskRegistry, uid: str) -> None:
    """A fresh, cache-free registry raises MaskIntegrityError on every read of ``uid``."""
    fresh = MaskRegistry(registry._root, disk_cache=False)
    reads: dict[str, Callable[[], Any]] = {
        "get_mask_by_uid": lambda: fresh.get_mask_by_uid(uid).compute(),
        "get_mask": lambda: fresh.get_mask(DET, NAME).compute(),
        "resolve_composite": lambda: fresh.resolve_composite(DET, [NAME]),
        "composite_from_uids": lambda: fresh.composite_from_uids([uid]),
    }
    for label, read in reads.items():
        with pytest.raises(MaskIntegrityError, match=uid) as info:
            read()
        assert "not served" in str(info.value), label
        fresh = MaskRegistry(registry._root, disk_cache=False)  # nothing remembered


def test_bytes_rewritten_through_the_raw_tiled_client_are_not_served(
    stored: Stored, embedded_dir: Path, tmp_path: Path
) -> None:
    registry, uid, mask = stored
    node = registry._root["masks"][uid]
    node.write_block(_altered(mask), block=(0, 0))
    # tiled allowed the write: the node now holds other bytes.
    assert np.asarray(node.read())[0, 0] != mask[0, 0]
    _refuses_to_serve(registry, uid)
    # So the fingerprint of the write-path test cannot pass over such a change.
    seen = fingerprint(World(registry, embedded_dir, tmp_path, uid, mask))
    assert seen["mask_sha256"] == "refused: MaskIntegrityError"


def test_fingerprint_sees_metadata_rewritten_through_the_raw_tiled_client(
    stored: Stored, embedded_dir: Path, tmp_path: Path
) -> None:
    """The write-path test's check itself: a changed metadata value shows."""
    registry, uid, mask = stored
    world = World(registry, embedded_dir, tmp_path, uid, mask)
    before = fingerprint(world)
    node = registry._root["masks"][uid]
    node.update_metadata(metadata={**node.metadata, "sample": "tampered"})
    after = fingerprint(world)
    assert {k for k in before if before[k] != after[k]} == {
        "mask_sha256",
        "record",
        "node_metadata",
    }
    assert after["record"] == "refused: MaskIntegrityError"


def test_bytes_rewritten_on_disk_are_not_served(stored: Stored, embedded_dir: Path) -> None:
    import zarr

    registry, uid, mask = stored
    folder = embedded_dir / "data" / "masks" / uid
    # A valid array of other bytes: readable, but its content hash differs.
    zarr.open_array(str(folder), mode="r+")[0, 0] = not mask[0, 0]
    _refuses_to_serve(registry, uid)


def test_truncated_array_file_is_not_served(stored: Stored, embedded_dir: Path) -> None:
    registry, uid, _ = stored
    chunks = [
        p
        for p in (embedded_dir / "data" / "masks" / uid).rglob("*")
        if p.is_file() and p.name != "zarr.json"
    ]
    assert chunks
    for chunk in chunks:
        data = chunk.read_bytes()
        chunk.write_bytes(data[: len(data) // 2])
    _refuses_to_serve(registry, uid)


def test_metadata_rewritten_through_the_raw_tiled_client_is_not_served(stored: Stored) -> None:
    registry, uid, _ = stored
    node = registry._root["masks"][uid]
    node.update_metadata(metadata={**node.metadata, "sample": "tampered"})
    assert registry._root["masks"][uid].metadata["sample"] == "tampered"  # tiled allowed it
    fresh = MaskRegistry(registry._root, disk_cache=False)
    with pytest.raises(MaskIntegrityError, match=uid):
        fresh.describe(uid)


def test_bytes_and_sha256_forged_together_are_not_served(
    stored: Stored, embedded_dir: Path
) -> None:
    """A forgery that keeps the bytes and their sha256 consistent: the slot's record hash."""
    import zarr

    registry, uid, mask = stored
    forged = mask.copy()
    forged[:8] = False
    zarr.open_array(str(embedded_dir / "data" / "masks" / uid), mode="r+")[...] = forged
    node = registry._root["masks"][uid]
    node.update_metadata(
        metadata={
            **node.metadata,
            "sha256": mask_sha256(forged),
            "masked_pixels": int(forged.size - forged.sum()),
        }
    )
    for call in (
        lambda r: r.get_mask_by_uid(uid).compute(),
        lambda r: r.composite_from_uids([uid]),
        lambda r: r.resolve_composite(DET, [NAME]),
        lambda r: r.get_mask(DET, NAME).compute(),
        lambda r: r.history(DET, NAME),
    ):
        fresh = MaskRegistry(registry._root, disk_cache=False)
        with pytest.raises(MaskIntegrityError, match=uid):
            call(fresh)
