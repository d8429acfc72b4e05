"""Refused calls and immutable versions, in tables.

Part one, the refusal table. Each row is one bad input on one surface (the
Python API, the ``chx-masks`` command or the preprocessor) and checks:

(a) how it is refused: exactly the exception class named (not a subclass),
    which is a ``ChxMasksError`` and the builtin it resembles; on the command
    line, exit status 1 and exactly one line, ``chx-masks: ...``;
(b) that the message names the offending value (the name, shape, dtype, key,
    uid, file...), and lacks any text the row says it must not hold;
(c) that nothing was written; where a row says so, also that the lineage or
    detector it touched reads as before.

A few rows are calls at the edge that must succeed: they check the result.

Each row runs in a world: a registry in a known state, set up once for the
module and shared by the rows, which write nothing.

- ``tiny``: an embedded registry with a small registered detector holding a
  superseded version, a retired lineage and an active set, beside the input
  files of the command-line rows and a RunEngine with a simulated detector (a
  refused run must emit no document). The command runs through click's
  ``CliRunner`` with ``--dir`` on the same directory. Nothing written means:
  ``snapshot`` equal, and every row of tiled's catalog, the active sets, and
  the sha256 of every array (read straight from tiled) and of every file
  under ``data/``.
- ``empty`` (never written), ``base`` (``DET``/base, a retired ``DET``/old and
  ``DET``/other) and ``custom`` (only the detector ``NEW_DET``, 7x9): each on
  both backends, an embedded registry and a container on the loopback tiled
  server. Nothing written means ``snapshot`` equal: the public listings with
  retired lineages, the detectors, the keys of the tiled tree and, embedded,
  the data files.

A row that shows a library bug is marked ``xfail(strict=True)`` with the
function at fault in its reason.

Part two, the write paths: every public write path is tried, in order, against
one lineage of an embedded registry, and the fingerprint of its first version
must never change. Bytes or metadata changed under the registry, through the
raw tiled client or on disk, make a later read raise ``MaskIntegrityError``.

Part three: inputs that are accepted, and the malformed-input table of
``tests/input_table.py`` on an embedded registry.

The number of rows per surface and of write paths are printed in pytest's
terminal summary.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import sqlite3
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import EIGER500K, SHAPE_4M, SHAPE_500K, SUMMARY, ones, random_mask, server_node_uri
from metadata_cases import KEPT as KEPT_METADATA
from metadata_cases import REFUSED as REFUSED_METADATA
from metadata_cases import nested

import chx_masks
from bluesky_callbacks import MaskProvenance
from bluesky_callbacks.sim import SimEiger
from chx_masks import (
    ChxMasksError,
    DetectorNotFoundError,
    MaskExistsError,
    MaskIntegrityError,
    MaskNotFoundError,
    MaskRegistry,
    MaskValidationError,
    mask_sha256,
)
from chx_masks import generate as gen
from chx_masks._cli import main
from chx_masks.io import ingest_master_file, register_from_file, write_mask

DET = EIGER500K  # a built-in Eiger
SHAPE = SHAPE_500K
TRANSPOSED = SHAPE[::-1]
TINY = "tiny_image"  # a registered detector holding the tiny world's lineages
TINY_DEVICE = "tiny"  # its simulated ophyd device (data key f"{name}_image")
TINY_SHAPE = (6, 8)
NEW_DET = "pilatus_new_image"
UNKNOWN = "pilatus_nowhere_image"
UNKNOWN_DEVICE = "pilatus_nowhere"
NO_SUCH_UID = "0b7d2f0e-9a53-4b7e-8a3c-2b9f2c1d0e4f"
FRESH_UID = str(uuid.uuid4())  # a new unknown uid each run (not in any test id)
LONG_NAME = "x" * 300
EARLY = "2000-01-01T00:00:00+00:00"
BACKENDS = ("embedded", "server")

# The builtin each registry error also is, so `except KeyError` keeps working.
BUILTIN = {
    MaskNotFoundError: KeyError,
    DetectorNotFoundError: KeyError,
    MaskValidationError: ValueError,
    MaskExistsError: ValueError,
}

Surface = str  # "api" | "cli" | "preprocessor"
Fragment = str | Callable[["World"], str]


# ------------------------------------------------------------------ the state


def snapshot(registry: MaskRegistry) -> dict[str, Any]:
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


def _digest(data: bytes | np.ndarray) -> str:
    if isinstance(data, np.ndarray):
        head = f"{data.dtype.str}{data.shape}".encode()
        return hashlib.sha256(head + np.ascontiguousarray(data).tobytes()).hexdigest()
    return hashlib.sha256(data).hexdigest()


# The tables of tiled's catalog that hold what was stored (the full-text index
# tables are derived from nodes.metadata).
_CATALOG_TABLES = (
    "nodes",
    "nodes_closure",
    "structures",
    "data_sources",
    "assets",
    "data_source_asset_association",
    "revisions",
    "links",
)


def _catalog(directory: Path) -> dict[str, list[tuple]]:
    """Every row of an embedded registry's catalog (read-only, beside tiled)."""
    connection = sqlite3.connect(f"file:{directory / 'catalog.db'}?mode=ro", uri=True)
    try:
        present = {
            name
            for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        return {
            table: connection.execute(f'SELECT * FROM "{table}" ORDER BY rowid').fetchall()
            for table in _CATALOG_TABLES
            if table in present
        }
    finally:
        connection.close()


def _file_sha256(directory: Path) -> dict[str, str]:
    """The sha256 of every file under an embedded registry's ``data/``."""
    data = directory / "data"
    return {
        str(path.relative_to(data)): _digest(path.read_bytes())
        for path in sorted(data.rglob("*"))
        if path.is_file()
    }


def registry_state(world: World) -> dict[str, Any]:
    """``snapshot`` plus the catalog, active sets and content hashes (embedded only)."""
    assert world.directory is not None
    registry = world.registry
    state = snapshot(registry)
    state["catalog"] = _catalog(world.directory)
    state["active_sets"] = registry.active_sets()
    masks = registry._root["masks"]
    # Straight from tiled, not through the registry's caches.
    state["arrays"] = {uid: _digest(np.asarray(node.read())) for uid, node in masks.items()}
    state["file_sha256"] = _file_sha256(world.directory)
    return state


def _snapshot_state(world: World) -> dict[str, Any]:
    return snapshot(world.registry)


def _summary(changes: dict[str, Any]) -> str:
    """What changed, briefly: the keys added, removed or changed in each part of the state."""
    parts = []
    for part, (old, new) in changes.items():
        if isinstance(old, dict) and isinstance(new, dict):
            added = sorted(map(str, new.keys() - old.keys()))
            removed = sorted(map(str, old.keys() - new.keys()))
            changed = sorted(str(k) for k in old.keys() & new.keys() if old[k] != new[k])
            parts.append(f"{part} (added {added}, removed {removed}, changed {changed})")
        else:
            parts.append(f"{part} ({str(old)[:200]} -> {str(new)[:200]})")
    return "; ".join(parts)


# ------------------------------------------------------------------ the worlds


@dataclass
class World:
    """A registry in a known state, and what the rows run on it need."""

    registry: MaskRegistry
    uids: dict[str, str]
    state: Callable[[World], dict[str, Any]]
    directory: Path | None = None  # an embedded registry's directory
    files: Path | None = None
    cache: Path | None = None
    RE: Any = None
    listing: list[tuple[str, str]] = field(default_factory=list)  # get_masks() at set-up
    baseline: dict[str, Any] | None = None
    docs: list[tuple[str, dict]] = field(default_factory=list)

    def file(self, name: str) -> Path:
        assert self.files is not None
        return self.files / name


class Worlds:
    """The module's worlds, each built on first use and closed with the module."""

    def __init__(self, top: Path, server: Any) -> None:
        self.top = top
        self.server = server
        self.built: dict[tuple[str, str], World] = {}
        self.closers: list[Callable[[], None]] = []

    def get(self, name: str, backend: str) -> World:
        if (name, backend) not in self.built:
            self.built[name, backend] = _BUILDERS[name](self, backend)
        return self.built[name, backend]

    def open(self, name: str, backend: str) -> tuple[MaskRegistry, Path | None]:
        """A new, empty registry on ``backend``: (registry, its directory if embedded)."""
        top = self.top / f"{name}-{backend}"
        top.mkdir()
        if backend == "embedded":
            registry = MaskRegistry.embedded(top / "registry", disk_cache=top / "cache")
            directory: Path | None = top / "registry"
        else:
            from tiled.client import from_uri

            server = self.server
            key = f"test-{uuid.uuid4().hex[:12]}"
            root = from_uri(server.uri)
            root.create_container(key=key)
            root.context.close()
            uri = server_node_uri(server, key)
            registry = MaskRegistry.from_uri(uri, api_key=server.api_key, disk_cache=top / "cache")
            directory = None
        self.closers.append(registry.close)
        return registry, directory

    def close(self) -> None:
        for close in reversed(self.closers):
            close()


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory, tiled_server: Any) -> Iterator[Worlds]:
    """Started after the loopback server: starting it would void an embedded registry's key."""
    built = Worlds(tmp_path_factory.mktemp("refusals"), tiled_server)
    yield built
    built.close()


@pytest.fixture(scope="module")
def world(worlds: Worlds) -> World:
    """The tiny world."""
    return worlds.get("tiny", "embedded")


def _write_inputs(files: Path) -> None:
    """The mask files the command-line rows read, good and bad."""
    import fabio.edfimage
    import tifffile

    files.mkdir()
    keep = np.ones(TINY_SHAPE, dtype=bool)
    keep[2, 3] = False
    np.save(files / "good_new.npy", keep)
    np.save(files / "small.npy", np.ones((3, 3), dtype=bool))
    np.save(files / "ints.npy", keep.astype(np.int64))
    (files / "notes.npy").write_text("pixel 3,4 is hot\n")
    # Truncated files: a real file of the right shape, cut in half.
    big = np.ones(SHAPE, dtype=bool)
    big[100:120, :] = False
    np.save(files / "cut.npy", big)
    fabio.edfimage.EdfImage(data=(~big).astype(np.uint8)).write(str(files / "cut.edf"))
    tifffile.imwrite(files / "cut.tif", big.astype(np.uint8), compression="zlib")
    for name in ("cut.npy", "cut.edf", "cut.tif"):
        data = (files / name).read_bytes()
        (files / name).write_bytes(data[: len(data) // 2])


def _tiny(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(TINY_SHAPE) > 0.2


def _close_run_engine(engine: Any) -> None:
    """Stop and close the RunEngine's loop (as tests/conftest.py's ``RE`` fixture does)."""
    if engine.state != "idle":
        engine.halt()
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(timeout=5)
    engine.loop.close()


def _build_tiny(worlds: Worlds, backend: str) -> World:
    """Lineages, a superseded and a retired version, an active set; files; a RunEngine."""
    from bluesky import RunEngine

    assert backend == "embedded"
    top = worlds.top / "tiny"
    registry = MaskRegistry.embedded(top / "registry", disk_cache=False)
    worlds.closers.append(registry.close)
    registry.register_detector(TINY, TINY_SHAPE, metadata={"site": "test bench"})
    uids = {
        "base v0": registry.register_mask(TINY, "base", _tiny(1), metadata={"sample": "silica"}),
    }
    uids["base"] = registry.update_mask(TINY, "base", _tiny(2))
    uids["old"] = registry.register_mask(TINY, "old", _tiny(3))
    registry.delete_mask(TINY, "old")
    registry.activate(TINY, ["base"], note="set up by test_refusals")
    _write_inputs(top / "files")
    engine = RunEngine({})
    worlds.closers.append(lambda: _close_run_engine(engine))
    return World(
        registry,
        uids,
        registry_state,
        directory=top / "registry",
        files=top / "files",
        cache=top / "cache",
        RE=engine,
    )


def _build_empty(worlds: Worlds, backend: str) -> World:
    registry, directory = worlds.open("empty", backend)
    return World(registry, {}, _snapshot_state, directory=directory)


def _build_scratch(worlds: Worlds, backend: str) -> World:
    """An empty registry that the tests of accepted input write to."""
    registry, directory = worlds.open("scratch", backend)
    return World(registry, {}, _snapshot_state, directory=directory)


def _build_base(worlds: Worlds, backend: str) -> World:
    """DET/base version 0, DET/old retired (version 0 a mask, 1 its retirement), DET/other."""
    registry, directory = worlds.open("base", backend)
    uids = {"base": registry.register_mask(DET, "base", random_mask(seed=1))}
    uids["old"] = registry.register_mask(DET, "old", random_mask(seed=2))
    registry.delete_mask(DET, "old")
    uids["other"] = registry.register_mask(DET, "other", random_mask(seed=5))
    return World(registry, uids, _snapshot_state, directory=directory, listing=registry.get_masks())


def _build_custom(worlds: Worlds, backend: str) -> World:
    """Only a registered detector, NEW_DET (7x9)."""
    registry, directory = worlds.open("custom", backend)
    registry.register_detector(NEW_DET, (7, 9))
    return World(registry, {}, _snapshot_state, directory=directory)


_BUILDERS: dict[str, Callable[[Worlds, str], World]] = {
    "tiny": _build_tiny,
    "empty": _build_empty,
    "scratch": _build_scratch,
    "base": _build_base,
    "custom": _build_custom,
}


# ---------------------------------------------------------------- the surfaces


@dataclass(frozen=True)
class Case:
    """One bad input on one surface, and what its refusal must say."""

    label: str
    surface: Surface
    on: str = "tiny"  # the world: tiny (embedded only), or empty, base, custom (both backends)
    call: Callable[[World], Any] | None = None  # api / preprocessor
    args: tuple[str, ...] = ()  # cli; "@name" is a file of World.files
    error: type[Exception] | None = None  # None: a call that succeeds
    fragments: tuple[Fragment, ...] = ()
    absent: tuple[str, ...] = ()  # text the message must not hold
    # The result (error None) or the exception: what is wrong with it, or None.
    verify: Callable[[World, Any], str | None] | None = None
    # After the call: what is wrong with the lineage or detector it touched, or None.
    then: Callable[[World], str | None] | None = None
    progress_line_ok: bool = True  # cli: tolerate click's progress-bar label
    bug: str | None = None


def _text(world: World, fragment: Fragment) -> str:
    return fragment(world) if callable(fragment) else fragment


def _wrong_exception(exc: Exception, case: Case, fragments: list[str]) -> list[str]:
    """What is wrong with the exception ``case`` raised."""
    assert case.error is not None
    error, message, wrong = case.error, str(exc), []
    if type(exc) is not error:
        wrong.append(f"raised {type(exc).__name__}, not {error.__name__}")
    if not isinstance(exc, ChxMasksError):
        wrong.append("not a ChxMasksError")
    if error in BUILTIN and not isinstance(exc, BUILTIN[error]):
        wrong.append(f"not a {BUILTIN[error].__name__}")
    missing = [f for f in fragments if f not in message]
    if missing:
        wrong.append(f"message lacks {missing}")
    present = [f for f in case.absent if f in message]
    if present:
        wrong.append(f"message holds {present}")
    return wrong


def _refusal_problem(world: World, case: Case, fragments: list[str]) -> str | None:
    """What is wrong with how the call is refused, or None if it is refused right."""
    assert case.call is not None and case.error is not None
    try:
        case.call(world)
    except Exception as exc:
        wrong = _wrong_exception(exc, case, fragments)
        also = case.verify(world, exc) if case.verify is not None else None
        if also:
            wrong.append(also)
        return f"{'; '.join(wrong)} (message: {str(exc)!r})" if wrong else None
    return f"did not raise {case.error.__name__}"


def _python_problem(world: World, case: Case) -> str | None:
    assert case.call is not None
    fragments = [_text(world, f) for f in case.fragments]
    if case.error is not None:
        world.docs = []
        problem = _refusal_problem(world, case, fragments)
        emitted = [name for name, _ in world.docs]
        if emitted:  # a refused run must not open
            return f"{problem + '; ' if problem else ''}emitted documents {emitted}"
        return problem
    try:
        result = case.call(world)
    except Exception as exc:
        return f"raised {type(exc).__name__}({exc})"
    assert case.verify is not None
    return case.verify(world, result)


def _cli_problem(world: World, case: Case) -> str | None:
    args = [str(world.file(a[1:])) if a.startswith("@") else a for a in case.args]
    result = CliRunner().invoke(
        main,
        ["--dir", str(world.directory), *args],
        env={"CHX_MASKS_CACHE_DIR": str(world.cache)},
    )
    wrong = []
    if result.exit_code != 1:
        wrong.append(f"exit status {result.exit_code}")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        wrong.append(f"raised {type(result.exception).__name__}({result.exception})")
    lines = [line for line in result.output.splitlines() if line.strip()]
    if case.progress_line_ok:
        lines = [line for line in lines if line != "importing"]
    if len(lines) != 1 or not lines[0].startswith("chx-masks: "):
        wrong.append("not one 'chx-masks: ...' line")
    missing = [f for f in (_text(world, f) for f in case.fragments) if f not in result.output]
    if missing:
        wrong.append(f"output lacks {missing}")
    return f"{'; '.join(wrong)} (output: {result.output!r})" if wrong else None


def _judge(world: World, case: Case) -> str | None:
    """Run ``case`` on ``world``: what is wrong, or None. Sets the world's baseline."""
    # The state after the previous row is this row's state before: nothing but
    # these rows touches a world's registry.
    before = world.baseline if world.baseline is not None else world.state(world)
    if case.surface == "cli":
        problems = [_cli_problem(world, case)]
    else:
        problems = [_python_problem(world, case)]
    if case.then is not None:
        problems.append(case.then(world))
    after = world.state(world)
    world.baseline = after
    wrote = _changes(before, after)
    if wrote:
        problems.append(f"wrote: {_summary(wrote)}")
    return "; ".join(p for p in problems if p) or None


# ------------------------------------------------------------------ preprocessor


def run_count(
    world: World,
    provenance: MaskProvenance,
    *,
    md: dict[str, Any] | None = None,
    device: str = TINY_DEVICE,
    shape: tuple[int, int] = TINY_SHAPE,
) -> dict[str, Any]:
    """``count`` one frame of a simulated detector through ``provenance``; the start doc."""
    from bluesky.plans import count

    engine = world.RE
    world.docs = docs = []
    engine.preprocessors[:] = [provenance]
    token = engine.subscribe(lambda name, doc: docs.append((name, doc)))
    try:
        engine(count([SimEiger(device, shape=shape)], num=1, md=md or {}))
    finally:
        engine.unsubscribe(token)
        engine.preprocessors.clear()
    return next(doc for name, doc in docs if name == "start")


def _configured(world: World, **kwargs: Any) -> MaskProvenance:
    return MaskProvenance(world.registry, {TINY: ["base"]}, **kwargs)


def _records_missing_mask(world: World, start: dict[str, Any]) -> str | None:
    """Policy "record": the run opened, finished, and says which mask is missing."""
    record = start.get("masks", {}).get(TINY, {})
    wrong = []
    if record.get("uids") != [] or start.get("mask_uids") != []:
        wrong.append(f"uids recorded: {record.get('uids')}, {start.get('mask_uids')}")
    error = record.get("error") or ""
    if not error.startswith("MaskNotFoundError") or "'nope'" not in repr(record.get("names")):
        wrong.append(f"error record {record!r}")
    if "nope" not in error:
        wrong.append(f"error does not name 'nope': {error!r}")
    stops = [doc for name, doc in world.docs if name == "stop"]
    if [s["exit_status"] for s in stops] != ["success"]:
        wrong.append(f"run did not finish: {stops}")
    return "; ".join(wrong) or None


# ------------------------------------------------------------- row constructors


def api(
    label: str,
    error: type[Exception] | None,
    call: Callable[[World], Any],
    *fragments: Fragment,
    on: str = "tiny",
    **kw: Any,
) -> Case:
    return Case(label, "api", on=on, call=call, error=error, fragments=fragments, **kw)


def cli(label: str, args: tuple[str, ...], *fragments: Fragment, **kw: Any) -> Case:
    return Case(label, "cli", args=args, fragments=fragments, **kw)


def pre(
    label: str,
    error: type[Exception] | None,
    call: Callable[[World], Any],
    *fragments: Fragment,
    **kw: Any,
) -> Case:
    return Case(label, "preprocessor", call=call, error=error, fragments=fragments, **kw)


def _register(
    mask: Any, *, detector: str = DET, name: str = "m", **kw: Any
) -> Callable[[World], Any]:
    return lambda w: w.registry.register_mask(detector, name, mask, **kw)


def _with_metadata(metadata: Any) -> Callable[[World], Any]:
    return lambda w: w.registry.register_mask(TINY, "m", _tiny(9), metadata=metadata)


def _nan_mask() -> np.ndarray:
    mask = np.ones(SHAPE, dtype=np.float64)
    mask[10, 10] = np.nan
    return mask


def _with_value(value: Any, dtype: type) -> np.ndarray:
    """A mask of ones in ``dtype`` with one pixel set to ``value``."""
    mask = ones().astype(dtype)
    mask[3, 4] = value
    return mask


def _short_row() -> list[list[bool]]:
    rows = ones().tolist()
    rows[7] = rows[7][:-1]
    return rows


def _short(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


class _Opaque:
    """An object JSON cannot hold."""


OVERSIZED = {"notes": "x" * (16 << 20)}  # 16 MiB of metadata for one mask


# ------------------------------------------------------- checks after a refusal


def _history_is(name: str, *keys: str) -> Callable[[World], str | None]:
    """The lineage DET/``name`` holds exactly the versions ``keys`` of the world's uids."""

    def check(w: World) -> str | None:
        uids = [r.uid for r in w.registry.history(DET, name)]
        want = [w.uids[key] for key in keys]
        return None if uids == want else f"history of {name}: {uids}, not {want}"

    return check


def _base_kept_version_0(w: World) -> str | None:
    versions = [(r.uid, r.version) for r in w.registry.history(DET, "base")]
    current = w.registry.get_mask_uid(DET, "base")
    if versions != [(w.uids["base"], 0)] or current != w.uids["base"]:
        return f"base now {versions}, current {current}"
    return None


def _base_as_registered(w: World) -> str | None:
    wrong = [_history_is("base", "base")(w)]
    if w.registry.get_mask_uid(DET, "base") != w.uids["base"]:
        wrong.append("base resolves to another uid")
    if not np.array_equal(w.registry.get_mask(DET, "base").compute(), random_mask(seed=1)):
        wrong.append("base reads other bytes")
    return "; ".join(p for p in wrong if p) or None


def _retired_stays_retired(w: World) -> str | None:
    wrong = [_history_is("old", "old")(w)]
    if w.registry.get_masks() != w.listing:
        wrong.append(f"active lineages {w.registry.get_masks()}, not {w.listing}")
    return "; ".join(p for p in wrong if p) or None


def _shape_is(detector: str, shape: tuple[int, int]) -> Callable[[World], str | None]:
    def check(w: World) -> str | None:
        now = w.registry.get_detector(detector).shape
        return None if now == shape else f"{detector} is now {now}, not {shape}"

    return check


def _lists_reserved_keys(w: World, error: Exception) -> str | None:
    listed = str(error).split("reserved: ", 1)[1]
    missing = [k for k in ("uid", "sha256", "version", "detector", "name") if k not in listed]
    return f"reserved keys not listed: {missing}" if missing else None


def _is_base(w: World, uid: str) -> str | None:
    return None if uid == w.uids["base"] else f"resolved {uid}, not base"


def _found_nothing(w: World, found: Any) -> str | None:
    uids = [r.uid for r in found]
    return None if uids == [] else f"found {uids}"


def _registered_at(w: World) -> str:
    return w.registry.describe(w.uids["base"]).registered_at.isoformat()


# ------------------------------------------------------------------ the table

TINY_ROWS = [
    # -------------------------------------------------------- Python API: content
    api(
        "uint8 mask",
        MaskValidationError,
        _register(np.ones(SHAPE, np.uint8)),
        "uint8",
        "allow_binary=True",
    ),
    api(
        "wrong shape",
        MaskValidationError,
        _register(np.ones((2167, 2070), bool)),
        "2167x2070",
        "514x1030",
        DET,
    ),
    api(
        "3-D mask", MaskValidationError, _register(np.ones((2, *SHAPE), bool)), "3-D", "2x514x1030"
    ),
    api(
        "NaN with allow_binary",
        MaskValidationError,
        _register(_nan_mask(), allow_binary=True),
        "NaN",
    ),
    api("empty 0x0 array", MaskValidationError, _register(np.zeros((0, 0), bool)), "0x0"),
    api("empty list", MaskValidationError, _register([]), "shape 0"),
    api(
        "transposed",
        MaskValidationError,
        _register(np.ones(SHAPE[::-1], bool)),
        "1030x514",
        "mask.T",
    ),
    # ---------------------------------------------------- Python API: detectors
    api(
        "register on unknown detector",
        DetectorNotFoundError,
        _register(np.ones(SHAPE, bool), detector=UNKNOWN),
        repr(UNKNOWN),
        "register_detector",
    ),
    # -------------------------------------------------------- Python API: names
    api(
        "name with path separator",
        MaskValidationError,
        _register(np.ones(SHAPE, bool), name="a/b"),
        "'a/b'",
        "'/'",
    ),
    api(
        "name with NUL",
        MaskValidationError,
        _register(np.ones(SHAPE, bool), name="a\x00b"),
        repr("a\x00b"),
    ),
    api(
        "name with newline (delete)",
        MaskValidationError,
        lambda w: w.registry.delete_mask(TINY, "a\nb"),
        repr("a\nb"),
    ),
    api(
        "300-character name",
        MaskValidationError,
        _register(np.ones(SHAPE, bool), name=LONG_NAME),
        "300 characters",
    ),
    # ----------------------------------------------------- Python API: metadata
    api(
        "set in metadata names its key",
        MaskValidationError,
        _with_metadata({"pixels": {1, 2}}),
        "set",
        "'pixels'",
    ),
    api(
        "object in metadata",
        MaskValidationError,
        _with_metadata({"thing": _Opaque()}),
        "JSON-serializable",
        "_Opaque",
    ),
    api("reserved key uid", MaskValidationError, _with_metadata({"uid": "x"}), "'uid'"),
    api(
        "reserved key version (update)",
        MaskValidationError,
        lambda w: w.registry.update_mask(TINY, "base", _tiny(9), metadata={"version": 9}),
        "'version'",
    ),
    # -------------------------------------------------- Python API: uids, versions
    api(
        "unknown uid",
        MaskNotFoundError,
        lambda w: w.registry.get_mask_by_uid(NO_SUCH_UID),
        NO_SUCH_UID,
    ),
    api(
        "path as uid",
        MaskNotFoundError,
        lambda w: w.registry.get_mask_by_uid("../../etc/passwd"),
        "'../../etc/passwd'",
    ),
    api(
        "missing version",
        MaskNotFoundError,
        lambda w: w.registry.get_mask(TINY, "base", version=7),
        "no version 7",
        "[0, 1]",
    ),
    # ------------------------------------------------------------ Python API: as_of
    # Not refusals, by the API's definition (chx_masks/_content.py:to_datetime): a
    # naive time is local time, and a future time resolves the version current now.
    api(
        "unparseable as_of",
        MaskValidationError,
        lambda w: w.registry.get_mask_uid(TINY, "base", as_of="yesterday"),
        "'yesterday'",
        "ISO 8601",
    ),
    api(
        "NaN as_of",
        MaskValidationError,
        lambda w: w.registry.get_mask(TINY, "base", as_of=float("nan")),
        "as_of=nan",
    ),
    api(
        "as_of before the first version",
        MaskNotFoundError,
        lambda w: w.registry.get_mask_uid(TINY, "base", as_of=EARLY),
        "2000-01-01",
        "first version was registered at",
    ),
    # ------------------------------------------------------- Python API: lineages
    api(
        "register an active name",
        MaskExistsError,
        lambda w: w.registry.register_mask(TINY, "base", _tiny(9)),
        "base",
        lambda w: w.uids["base"],
        "update_mask",
    ),
    api(
        "activate an unknown name",
        MaskNotFoundError,
        lambda w: w.registry.activate(TINY, ["base", "nope"]),
        "nope",
    ),
    # ---------------------------------------------------------------- command line
    cli("register bad name", ("register", TINY, "a/b", "@good_new.npy"), "'a/b'"),
    cli("register unknown detector", ("register", UNKNOWN, "m", "@good_new.npy"), UNKNOWN),
    cli(
        "register reserved metadata key",
        ("register", TINY, "m", "@good_new.npy", "-m", "uid=123"),
        "'uid'",
    ),
    cli("register int64 file", ("register", TINY, "m", "@ints.npy"), "ints.npy", "int64"),
    cli("import truncated .npy", ("import", DET, "@cut.npy"), "cut.npy"),
    cli("import truncated .edf", ("import", DET, "@cut.edf"), "cut.edf", "truncated"),
    cli("import truncated .tif", ("import", DET, "@cut.tif"), "cut.tif"),
    cli("import text file named .npy", ("import", TINY, "@notes.npy"), "notes.npy"),
    cli("import wrong-shape file", ("import", TINY, "@small.npy"), "small.npy", "3x3", "6x8"),
    cli(
        "import refusal is one line",
        ("import", TINY, "@small.npy"),
        "small.npy",
        progress_line_ok=False,
    ),
    cli("delete unknown name", ("delete", TINY, "nope", "--yes"), "nope"),
    cli(
        "generate over an active name",
        ("generate", "rectangle", TINY, "base", "--top-left", "0", "0", "--bottom-right", "2", "2"),
        "base",
        "already registered",
    ),
    cli("show unparseable as-of", ("show", TINY, "base", "--as-of", "yesterday"), "'yesterday'"),
    # ---------------------------------------------------------------- preprocessor
    pre(
        "unknown on_unavailable",
        MaskValidationError,
        lambda w: _configured(w, on_unavailable="ignore"),
        "'ignore'",
    ),
    pre(
        "masks value a bare string",
        MaskValidationError,
        lambda w: MaskProvenance(w.registry, {TINY: "base"}),
        "'base'",
    ),
    pre(
        "non-string mask name",
        MaskValidationError,
        lambda w: MaskProvenance(w.registry, {TINY: ["base", 5]}),
        "5",
    ),
    pre("zero timeout", MaskValidationError, lambda w: _configured(w, timeout=0), "timeout"),
    pre(
        "registry given as a URI string",
        MaskValidationError,
        lambda w: MaskProvenance("http://127.0.0.1:8000/masks", {TINY: ["base"]}),
        "http://127.0.0.1:8000/masks",
    ),
    pre(
        "unknown detector in masks= refuses the run",
        DetectorNotFoundError,
        lambda w: run_count(
            w, MaskProvenance(w.registry, {UNKNOWN: ["base"]}), device=UNKNOWN_DEVICE, shape=(4, 6)
        ),
        repr(UNKNOWN),
        "run was not opened",
    ),
    pre(
        "run names a missing mask: refused under 'raise'",
        MaskNotFoundError,
        lambda w: run_count(w, _configured(w), md={"mask_names": {TINY: ["nope"]}}),
        "nope",
        "run was not opened",
    ),
    pre(
        "run names a missing mask: recorded under 'record'",
        None,
        lambda w: run_count(
            w, _configured(w, on_unavailable="record"), md={"mask_names": {TINY: ["nope"]}}
        ),
        verify=_records_missing_mask,
    ),
    pre(
        "run mask_names not a mapping",
        MaskValidationError,
        lambda w: run_count(w, _configured(w), md={"mask_names": "base"}),
        "mask_names",
        "str",
    ),
    pre(
        "run mask_names with path separator",
        MaskValidationError,
        lambda w: run_count(w, _configured(w), md={"mask_names": {TINY: ["a/b"]}}),
        "'a/b'",
    ),
    pre(
        "run mask_names for an unknown detector",
        DetectorNotFoundError,
        lambda w: run_count(w, _configured(w), md={"mask_names": {UNKNOWN: ["base"]}}),
        repr(UNKNOWN),
    ),
    pre(
        "run mask_names with None as a name",
        MaskValidationError,
        lambda w: run_count(w, _configured(w), md={"mask_names": {TINY: [None]}}),
        "None",
    ),
    # --------------------------- cases that once wrote something before refusing
    cli(
        "import of a good and a bad file registers neither",
        ("import", TINY, "@good_new.npy", "@cut.npy"),
        "cut.npy",
    ),
    api("oversized metadata", MaskValidationError, _with_metadata(OVERSIZED), "metadata", "KiB"),
]

# ------------------------------------------------- both backends: mask content

CONTENT_ROWS = [
    *[
        api(
            f"non-array mask: {op} {mask!r}",
            MaskValidationError,
            lambda w, op=op, name=name, mask=mask: getattr(w.registry, op)(DET, name, mask),
            "2-D array of bool",
            type_name,
            on="base",
            then=_history_is("base", "base"),
        )
        for mask, type_name in [
            (None, "NoneType"),
            ("mask.npy", "str"),
            ({"mask": 1}, "dict"),
            (1, "int"),
        ]
        for op, name in [("register_mask", "m"), ("update_mask", "base")]
    ],
    *[
        api(
            f"ragged list: {label}",
            MaskValidationError,
            lambda w, rows=rows: w.registry.register_mask(DET, "m", rows()),
            "array of bool",
            on="empty",
        )
        for label, rows in [
            ("one short row", _short_row),
            ("tiny ragged", lambda: [[True, False], [True]]),
        ]
    ],
    *[
        api(
            f"numeric mask without allow_binary: {dtype.__name__}",
            MaskValidationError,
            lambda w, dtype=dtype: w.registry.register_mask(DET, "m", ones().astype(dtype)),
            np.dtype(dtype).name,
            "allow_binary=True",
            "astype(bool)",
            on="empty",
        )
        for dtype in (np.uint8, np.int64, np.float32, np.float64)
    ],
    *[
        api(
            f"non-binary value with allow_binary: {value} in {np.dtype(dtype).name}",
            MaskValidationError,
            lambda w, value=value, dtype=dtype: w.registry.register_mask(
                DET, "m", _with_value(value, dtype), allow_binary=True
            ),
            "0 and 1",
            shown,
            on="empty",
        )
        for value, dtype, shown in [
            (2, np.int64, "2"),
            (-1, np.int16, "-1"),
            (0.5, np.float64, "0.5"),
            (np.inf, np.float64, "inf"),
        ]
    ],
    *[
        api(
            f"NaN mask: allow_binary={allow}",
            MaskValidationError,
            lambda w, allow=allow: w.registry.register_mask(
                DET, "m", _nan_mask(), allow_binary=allow
            ),
            "NaN",
            on="empty",
        )
        for allow in (True, False)
    ],
    *[
        api(
            f"wrong dimensionality: {ndim}",
            MaskValidationError,
            lambda w, shape=shape: w.registry.register_mask(DET, "m", np.ones(shape, dtype=bool)),
            ndim,
            "514x1030",
            on="empty",
        )
        for shape, ndim in [(ones().size, "1-D"), ((2, *SHAPE), "3-D"), ((), "0-D")]
    ],
    api(
        "wrong shape names both shapes",
        MaskValidationError,
        lambda w: w.registry.register_mask(DET, "m", ones(SHAPE_4M)),
        "2167x2070",
        "514x1030",
        DET,
        absent=("transposed",),
        on="empty",
    ),
    api(
        "transposed mask hints at mask.T",
        MaskValidationError,
        lambda w: w.registry.register_mask(DET, "m", ones(TRANSPOSED)),
        "transposed",
        "mask.T",
        "1030x514",
        "514x1030",
        on="empty",
    ),
    api(
        "transposed update keeps the version",
        MaskValidationError,
        lambda w: w.registry.update_mask(DET, "base", ones(TRANSPOSED)),
        "mask.T",
        "1030x514",
        on="base",
        then=_base_kept_version_0,
    ),
]

# -------------------------------------------- both backends: detectors, names

DETECTOR_CALLS: dict[str, Callable[[MaskRegistry], Any]] = {
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

NAME_CALLS: dict[str, Callable[[MaskRegistry, Any], Any]] = {
    "update_mask": lambda reg, name: reg.update_mask(DET, name, ones()),
    "delete_mask": lambda reg, name: reg.delete_mask(DET, name),
    "get_mask": lambda reg, name: reg.get_mask(DET, name),
    "get_mask_uid": lambda reg, name: reg.get_mask_uid(DET, name),
    "history": lambda reg, name: reg.history(DET, name),
    "get_composite_mask": lambda reg, name: reg.get_composite_mask(DET, ["base", name]),
    "resolve_composite": lambda reg, name: reg.resolve_composite(DET, ["base", name]),
}

NAME_ROWS = [
    *[
        api(
            f"unknown detector: {op}",
            DetectorNotFoundError,
            lambda w, call=call: call(w.registry),
            repr(UNKNOWN),
            "register_detector",
            DET,  # lists the known detectors
            on="base",
        )
        for op, call in DETECTOR_CALLS.items()
    ],
    *[
        api(
            f"bad mask name: register_mask {_short(repr(name))}",
            MaskValidationError,
            lambda w, name=name: w.registry.register_mask(DET, name, ones()),
            "mask name",
            shown,
            on="empty",
        )
        for name, shown in BAD_NAMES
    ],
    *[
        api(
            f"bad mask name: {op} {name!r}",
            MaskValidationError,
            lambda w, call=call, name=name: call(w.registry, name),
            repr(name),
            on="base",
        )
        for op, call in NAME_CALLS.items()
        for name in ("a/b", " base")
    ],
    *[
        api(
            f"bad detector name: {_short(repr(name))}",
            MaskValidationError,
            lambda w, name=name: w.registry.register_detector(name, (5, 5)),
            "detector name",
            shown,
            on="empty",
        )
        for name, shown in BAD_NAMES
    ],
    *[
        api(
            f"dot detector name: {name!r}",
            MaskValidationError,
            lambda w, name=name: w.registry.register_detector(name, (5, 5)),
            repr(name),
            on="empty",
        )
        for name in (".", "..")
    ],
    api(
        "'..' as detector: get_detector",
        MaskValidationError,
        lambda w: w.registry.get_detector(".."),
        "'..'",
        on="base",
    ),
    api(
        "'..' as detector: register_mask",
        MaskValidationError,
        lambda w: w.registry.register_mask("..", "m", ones()),
        "'..'",
        on="base",
    ),
]

# ------------------------------------------------------ both backends: metadata

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

METADATA_CALLS: dict[str, Callable[[MaskRegistry, Any], Any]] = {
    "register_mask": lambda reg, md: reg.register_mask(DET, "m", ones(), metadata=md),
    "update_mask": lambda reg, md: reg.update_mask(DET, "base", ones(), metadata=md),
    "register_detector": lambda reg, md: reg.register_detector(NEW_DET, (5, 6), metadata=md),
}

METADATA_ROWS = [
    *[
        api(
            f"bad metadata: {op} {label}",
            MaskValidationError,
            lambda w, call=call, md=md: call(w.registry, md),
            "metadata",
            shown,
            on="base",
            then=_history_is("base", "base"),
        )
        for op, call in METADATA_CALLS.items()
        for label, md, shown in (BAD_METADATA if op == "register_mask" else SOME_BAD_METADATA)
    ],
    api(
        "reserved key: the message lists the reserved keys",
        MaskValidationError,
        lambda w: w.registry.register_mask(DET, "m", ones(), metadata={"sha256": "x"}),
        "reserved",
        verify=_lists_reserved_keys,
        on="empty",
    ),
    *[
        api(
            f"metadata at the edges: {label}",
            MaskValidationError,
            lambda w, md=md: w.registry.register_mask(DET, "edge", ones(), metadata=md),
            "metadata",
            fragment,
            on="base",
        )
        for label, md, fragment in REFUSED_METADATA
    ],
    *[
        api(
            f"search value not comparable: {label}",
            MaskValidationError,
            lambda w, query=query: w.registry.search(metadata=query),
            fragment,
            on="base",
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
    api(
        "search value int64 max is comparable (finds nothing)",
        None,
        lambda w: w.registry.search(metadata={"n": 2**63 - 1}),
        verify=_found_nothing,
        on="base",
    ),
    api(
        "search with a set value",
        MaskValidationError,
        lambda w: w.registry.search(metadata={"pixels": {1, 2}}),
        on="base",
    ),
]

# -------------------------------------------------- both backends: uids, versions

UID_ROWS = [
    *[
        api(
            f"unknown uid, empty registry: {lookup}",
            MaskNotFoundError,
            lambda w, lookup=lookup: getattr(w.registry, lookup)(FRESH_UID),
            FRESH_UID,
            on="empty",
        )
        for lookup in ("get_mask_by_uid", "describe")
    ],
    *[
        api(
            f"unknown uid: {lookup} {label}",
            MaskNotFoundError,
            lambda w, lookup=lookup, uid=uid: getattr(w.registry, lookup)(uid),
            uid,
            shown,
            on="base",
        )
        for lookup in ("get_mask_by_uid", "describe")
        for label, uid, shown in [
            ("a fresh uuid", FRESH_UID, "No mask with uid"),
            ("'not-a-uid'", "not-a-uid", "not a mask uid"),
            ("'base'", "base", "not a mask uid"),
            ("''", "", "not a mask uid"),
        ]
    ],
    *[
        api(
            f"missing version: {lookup} version={version}",
            MaskNotFoundError,
            lambda w, lookup=lookup, version=version: getattr(w.registry, lookup)(
                DET, "base", version=version
            ),
            f"version {version}",
            "versions: [0]",
            on="base",
        )
        for lookup in ("get_mask", "get_mask_uid")
        for version in (5, 1, -1)
    ],
    api(
        "version of a retirement is not a mask",
        MaskNotFoundError,
        lambda w: w.registry.get_mask(DET, "old", version=1),
        "version 1",
        "retirement",
        on="base",
    ),
    *[
        api(
            f"non-int version: {lookup} version={version!r}",
            MaskValidationError,
            lambda w, lookup=lookup, version=version: getattr(w.registry, lookup)(
                DET, "base", version=version
            ),
            "version must be an integer",
            repr(version),
            on="base",
        )
        for lookup in ("get_mask", "get_mask_uid")
        for version in ("1", 1.5, 0.0, True, [0])
    ],
    *[
        api(
            f"version and as_of together: {lookup}",
            MaskValidationError,
            lambda w, lookup=lookup: getattr(w.registry, lookup)(
                DET, "base", version=0, as_of="2100-01-01T00:00:00+00:00"
            ),
            "not both",
            on="base",
        )
        for lookup in ("get_mask", "get_mask_uid")
    ],
]

# ------------------------------------------------------------ both backends: as_of

AS_OF_EARLY: dict[str, Callable[[MaskRegistry], Any]] = {
    "get_mask": lambda reg: reg.get_mask(DET, "base", as_of=EARLY),
    "get_mask_uid": lambda reg: reg.get_mask_uid(DET, "base", as_of=EARLY),
    "get_composite_mask": lambda reg: reg.get_composite_mask(DET, ["base"], as_of=EARLY),
    "resolve_composite": lambda reg: reg.resolve_composite(DET, ["base"], as_of=EARLY),
}

UNPARSEABLE_AS_OF = ("yesterday", "2026-13-45", "2026-11-25 25:00")
OFF_CALENDAR_AS_OF = (1e20, -1e20, 2**70, datetime.datetime(1, 1, 1), "0001-01-01T00:00:00")
LAST_MINUTE = datetime.datetime(9999, 12, 31, 23, 59, tzinfo=datetime.timezone.utc)


def _as_of_lookup(lookup: str, as_of: Any) -> Callable[[World], Any]:
    """``lookup`` of DET/base (a composite of it) at ``as_of``."""
    names: Any = ["base"] if "composite" in lookup else "base"
    return lambda w: getattr(w.registry, lookup)(DET, names, as_of=as_of)


AS_OF_ROWS = [
    *[
        api(
            f"as_of before the first version: {op}",
            MaskNotFoundError,
            lambda w, call=call: call(w.registry),
            "2000-01-01",
            "first version was registered at",
            _registered_at,
            on="base",
        )
        for op, call in AS_OF_EARLY.items()
    ],
    *[
        api(
            f"unparseable as_of: {lookup} {as_of!r}",
            MaskValidationError,
            _as_of_lookup(lookup, as_of),
            repr(as_of),
            "ISO 8601",
            on="base",
        )
        for lookup in ("get_mask", "get_mask_uid", "resolve_composite")
        for as_of in UNPARSEABLE_AS_OF
    ],
    *[
        api(
            f"as_of outside the calendar: {lookup} {as_of!r}",
            MaskValidationError,
            _as_of_lookup(lookup, as_of),
            "as_of=",
            "'2026-11-25T10:00:00'",
            on="base",
        )
        for lookup in ("get_mask", "get_mask_uid", "resolve_composite")
        for as_of in OFF_CALENDAR_AS_OF
    ],
    api(
        "as_of at the calendar's last minute is a time like any other",
        None,
        lambda w: w.registry.get_mask_uid(DET, "base", as_of=LAST_MINUTE),
        verify=_is_base,
        on="base",
    ),
]

# ------------------------------------------------ both backends: lineages, composites

BAD_NAME_LISTS: list[tuple[str, Any, type[Exception], str]] = [
    ("empty list", [], MaskValidationError, "at least one"),
    ("bare string", "base", MaskValidationError, "['base']"),
    ("duplicate", ["base", "other", "base"], MaskValidationError, "['base']"),
    ("unknown among known", ["base", "missing", "other"], MaskNotFoundError, "missing"),
    ("retired among known", ["base", "old", "other"], MaskNotFoundError, "retired"),
]

LINEAGE_ROWS = [
    api(
        "register of an active name keeps the lineage",
        MaskExistsError,
        lambda w: w.registry.register_mask(DET, "base", ones()),
        "update_mask",
        "base",
        lambda w: w.uids["base"],
        on="base",
        then=_base_as_registered,
    ),
    *[
        api(
            f"unregistered name: {op}",
            MaskNotFoundError,
            lambda w, op=op, extra=extra: getattr(w.registry, op)(DET, "never", *extra),
            "never",
            "register_mask",
            on="base",
        )
        for op, extra in [("update_mask", (ones(),)), ("delete_mask", ())]
    ],
    *[
        api(
            f"retired name: {op}",
            MaskNotFoundError,
            lambda w, op=op, extra=extra: getattr(w.registry, op)(DET, "old", *extra),
            "old",
            "retired",
            "register_mask",
            on="base",
            then=_retired_stays_retired,
        )
        for op, extra in [("update_mask", (ones(),)), ("delete_mask", ())]
    ],
    *[
        api(
            f"bad composite names: {lookup} {label}",
            error,
            lambda w, lookup=lookup, names=names: getattr(w.registry, lookup)(DET, names),
            shown,
            on="base",
        )
        for lookup in ("get_composite_mask", "resolve_composite")
        for label, names, error, shown in BAD_NAME_LISTS
    ],
    *[
        api(
            f"non-iterable composite names: {lookup} {names!r}",
            MaskValidationError,
            lambda w, lookup=lookup, names=names: getattr(w.registry, lookup)(DET, names),
            on="base",
        )
        for lookup in ("get_composite_mask", "resolve_composite")
        for names in (None, 5)
    ],
]

# ----------------------------------------------- both backends: detector shapes

SHAPE_ROWS = [
    *[
        api(
            f"detector shape: {shape!r}",
            MaskValidationError,
            lambda w, shape=shape: w.registry.register_detector(NEW_DET, shape),
            "two positive integers",
            repr(shape),
            on="empty",
        )
        for shape in [(0, 5), (5,), "abc", (3, 4, 5), (-2, 5), (), None, 5, ("a", "b")]
    ],
    *[
        api(
            f"non-integer detector shape: {shape!r}",
            MaskValidationError,
            lambda w, shape=shape: w.registry.register_detector(NEW_DET, shape),
            "two positive integers",
            on="empty",
        )
        for shape in ["12", (2.5, 3), (True, 3)]
    ],
    *[
        api(
            f"built-in detector registered again: {'x'.join(map(str, shape))}",
            MaskExistsError,
            lambda w, shape=shape: w.registry.register_detector(DET, shape),
            DET,
            "514x1030",
            "x".join(map(str, shape)),
            on="base",
            then=_shape_is(DET, SHAPE),
        )
        for shape in (TRANSPOSED, SHAPE_4M, (514, 1031))
    ],
    api(
        "built-in detector registered again before any write",
        MaskExistsError,
        lambda w: w.registry.register_detector(DET, (5, 5)),
        "514x1030",
        "5x5",
        on="empty",
    ),
    api(
        "custom detector registered again transposed",
        MaskExistsError,
        lambda w: w.registry.register_detector(NEW_DET, (9, 7)),
        "7x9",
        "9x7",
        on="custom",
        then=_shape_is(NEW_DET, (7, 9)),
    ),
    api(
        "custom detector, mask of the wrong shape",
        MaskValidationError,
        lambda w: w.registry.register_mask(NEW_DET, "m", np.ones((9, 7), dtype=bool)),
        "7x9",
        "9x7",
        "mask.T",
        on="custom",
    ),
]

CASES: list[Case] = [
    *TINY_ROWS,
    *CONTENT_ROWS,
    *NAME_ROWS,
    *METADATA_ROWS,
    *UID_ROWS,
    *AS_OF_ROWS,
    *LINEAGE_ROWS,
    *SHAPE_ROWS,
]


def _params(case: Case) -> Iterator[Any]:
    marks = [pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else []
    if case.on == "tiny":
        yield pytest.param(case, "embedded", id=f"{case.surface}: {case.label}", marks=marks)
        return
    for backend in BACKENDS:
        label = f"{backend} {case.surface}: {case.label}"
        yield pytest.param(case, backend, id=label, marks=marks)


# Grouped by world and backend: the rows of one world run together on a worker.
_WORLD_ORDER = ("tiny", "empty", "base", "custom")
PARAMS = sorted(
    (param for case in CASES for param in _params(case)),
    key=lambda p: (_WORLD_ORDER.index(p.values[0].on), BACKENDS.index(p.values[1])),
)

SURFACES = Counter(case.surface for case in CASES)
KNOWN_BUGS = Counter(case.surface for case in CASES if case.bug)


def test_the_table_spans_three_surfaces() -> None:
    assert set(SURFACES) == {"api", "cli", "preprocessor"}
    assert sum(SURFACES.values()) >= 30
    assert len({p.id for p in PARAMS}) == len(PARAMS)  # no two rows share an id


@pytest.mark.parametrize(("case", "backend"), PARAMS)
def test_bad_input_is_refused_and_writes_nothing(worlds: Worlds, case: Case, backend: str) -> None:
    problem = _judge(worlds.get(case.on, backend), case)
    assert problem is None, problem


def test_harness_sees_a_changed_byte_and_a_write(world: World) -> None:
    """The tiny world's state check itself: one flipped byte of one array file, or a new node.

    Runs after the table (it writes to the tiny world's registry).
    """
    assert world.directory is not None
    state = registry_state(world)
    assert _changes(state, registry_state(world)) == {}
    target = next(p for p in sorted((world.directory / "data").rglob("0")) if p.is_file())
    original = target.read_bytes()
    target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        flipped = _file_sha256(world.directory)
    finally:
        target.write_bytes(original)
    assert flipped != state["file_sha256"]
    assert _changes(state, registry_state(world)) == {}
    world.registry.register_detector("harness_image", (2, 2))
    world.baseline = None
    assert {"catalog", "detector_records"} <= set(_changes(state, registry_state(world)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_harness_reports_a_write_and_a_call_that_is_not_refused(
    worlds: Worlds, backend: str
) -> None:
    """The row check itself, on the scratch registry: a row that writes, or does not raise."""
    world = worlds.get("scratch", backend)
    world.baseline = None
    writes = api(
        "writes", MaskValidationError, lambda w: w.registry.register_mask(DET, "w", ones())
    )
    assert re.search(
        r"did not raise MaskValidationError.*wrote: .*masks", _judge(world, writes) or ""
    )
    reads = api("reads", MaskNotFoundError, lambda w: w.registry.get_masks())
    assert "did not raise MaskNotFoundError" in (_judge(world, reads) or "")


# ------------------------------------------------------------ the write paths

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
class Original:
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


def _as_plain(value: Any) -> Any:
    """Metadata as plain JSON values, so a mapping view compares by content."""
    return json.loads(json.dumps(value, default=dict))


def fingerprint(world: Original) -> dict[str, Any]:
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
def original(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Original]:
    top = tmp_path_factory.mktemp("immutability")
    registry = MaskRegistry.embedded(top / "registry", disk_cache=False)
    mask = random_mask(seed=100)
    uid = registry.register_mask(DET, NAME, mask, metadata=METADATA)
    (top / "scratch").mkdir()
    yield Original(registry, top / "registry", top / "scratch", uid, mask)
    registry.close()


def _versions(w: Original) -> list[tuple[int, str]]:
    return [(r.version, r.uid) for r in w.registry.history(DET, NAME)]


def _new_version(w: Original, uid: str) -> None:
    """``uid`` is a new version of the lineage: not the original, the newest number."""
    assert uid != w.uid
    record = w.registry.describe(uid)
    assert (record.detector, record.name) == (DET, NAME)
    assert record.version == max(v for v, _ in _versions(w))


def _cli(w: Original, *args: str, code: int = 0, input: str | None = None) -> str:
    result = CliRunner().invoke(main, ["--dir", str(w.directory), *args], input=input)
    assert result.exit_code == code, result.output
    return result.stdout


def api_register_same_name(w: Original) -> None:
    with pytest.raises(MaskExistsError, match=w.uid):
        w.registry.register_mask(DET, NAME, w.other(1))


def api_register_same_name_same_bytes(w: Original) -> None:
    with pytest.raises(MaskExistsError):
        w.registry.register_mask(DET, NAME, w.original.copy(), metadata=METADATA)


def api_update(w: Original) -> None:
    _new_version(w, w.registry.update_mask(DET, NAME, w.other(2), metadata={"sample": "new"}))
    assert w.registry.describe(w.uid).superseded_at is not None


def api_update_same_bytes_keeps_metadata(w: Original) -> None:
    uid = w.registry.update_mask(DET, NAME, w.original.copy(), force=True)
    _new_version(w, uid)
    record = w.registry.describe(uid)
    assert record.sha256 == mask_sha256(w.original) and record.metadata == {"sample": "new"}


def api_register_detector_same_shape(w: Original) -> None:
    assert w.registry.register_detector(DET, SHAPE_500K).shape == SHAPE_500K


def api_register_detector_other_shape(w: Original) -> None:
    with pytest.raises(MaskExistsError):
        w.registry.register_detector(DET, SHAPE_500K[::-1])


def api_activate(w: Original) -> None:
    assert w.registry.activate(DET, [NAME], note="immutability").names == (NAME,)


def api_deactivate(w: Original) -> None:
    assert w.registry.deactivate(DET).names == ()


def module_register_same_name(w: Original) -> None:
    chx_masks.set_default_registry(w.registry)
    try:
        with pytest.raises(MaskExistsError):
            chx_masks.register_mask(DET, NAME, w.other(3))
    finally:
        chx_masks.set_default_registry(None)


def api_delete(w: Original) -> None:
    last = w.registry.delete_mask(DET, NAME)
    assert last.retired_at is not None and (DET, NAME) not in w.registry.get_masks()


def api_update_after_retire(w: Original) -> None:
    with pytest.raises(MaskNotFoundError, match="retired"):
        w.registry.update_mask(DET, NAME, w.other(4))


def api_delete_after_retire(w: Original) -> None:
    with pytest.raises(MaskNotFoundError, match="retired"):
        w.registry.delete_mask(DET, NAME)


def api_register_after_retire(w: Original) -> None:
    uid = w.registry.register_mask(DET, NAME, w.original.copy(), metadata=METADATA)
    _new_version(w, uid)
    assert w.registry.describe(uid).version > 0  # numbers are never reused


def module_delete_and_register_again(w: Original) -> None:
    chx_masks.set_default_registry(w.registry)
    try:
        chx_masks.delete_mask(DET, NAME)
        uid = chx_masks.register_mask(DET, NAME, w.other(5))
    finally:
        chx_masks.set_default_registry(None)
    _new_version(w, uid)


def adopt_legacy_claiming_version_0(w: Original) -> None:
    """A legacy node (older flat layout) that says it is this lineage's version 0."""
    key = str(uuid.uuid4())
    w.registry._root.write_array(
        w.other(6),
        key=key,
        metadata={"spec": "mask", "name": NAME, "detector": DET, "version": 0},
    )
    assert key not in {r.uid for r in w.registry.adopt_legacy()}
    assert w.registry.get_mask_uid(DET, NAME, version=0) == w.uid


def adopt_legacy_keyed_by_the_uid(w: Original) -> None:
    """A legacy node at the container's top, keyed by the original uid itself."""
    w.registry._root.write_array(
        w.other(7),
        key=w.uid,
        metadata={"spec": "mask", "name": NAME, "detector": DET, "version": 99},
    )
    assert w.uid not in {r.uid for r in w.registry.adopt_legacy()}


def io_register_from_file_same_name(w: Original) -> None:
    with pytest.raises(MaskExistsError):
        register_from_file(w.registry, DET, NAME, w.npy("io.npy", w.other(8)))


def io_register_from_file_update(w: Original) -> None:
    _new_version(
        w, register_from_file(w.registry, DET, NAME, w.npy("io2.npy", w.other(9)), update=True)
    )


def io_ingest_master_file_same_content(w: Original) -> None:
    current = w.registry.get_mask_uid(DET, NAME)
    master = write_mask(w.registry.get_mask(DET, NAME).compute(), w.scratch / "same_master.h5")
    assert ingest_master_file(w.registry, DET, NAME, master) == (current, False)


def io_ingest_master_file_new_content(w: Original) -> None:
    master = write_mask(w.other(10), w.scratch / "new_master.h5")
    uid, created = ingest_master_file(w.registry, DET, NAME, master)
    assert created
    _new_version(w, uid)


def generate_register_same_name(w: Original) -> None:
    with pytest.raises(MaskExistsError):
        gen.circle(SHAPE_500K, (100, 100), 10).register(w.registry, DET, NAME)


def generate_register_update(w: Original) -> None:
    _new_version(
        w, gen.circle(SHAPE_500K, (200, 300), 12).register(w.registry, DET, NAME, update=True)
    )


def cli_register_same_name(w: Original) -> None:
    result = CliRunner().invoke(
        main, ["--dir", str(w.directory), "register", DET, NAME, str(w.npy("cli.npy", w.other(11)))]
    )
    assert result.exit_code == 1 and "already registered" in result.stderr, result.output


def cli_update(w: Original) -> None:
    _cli(w, "update", DET, NAME, str(w.npy("cli2.npy", w.other(12))), "-m", "sample=cli")
    _new_version(w, w.registry.get_mask_uid(DET, NAME))


def cli_import_skips_existing(w: Original) -> None:
    rows = json.loads(_cli(w, "import", DET, str(w.npy(f"{NAME}.npy", w.other(13))), "--json"))
    assert [r["outcome"] for r in rows] == ["skipped"]


def cli_import_update(w: Original) -> None:
    rows = json.loads(
        _cli(w, "import", DET, str(w.npy(f"{NAME}.npy", w.other(14))), "--update", "--json")
    )
    assert [r["outcome"] for r in rows] == ["updated"]
    _new_version(w, rows[0]["uid"])


def cli_generate_same_name(w: Original) -> None:
    _cli(w, "generate", "circle", DET, NAME, "--center", "50", "60", "--radius", "5", code=1)


def cli_generate_dry_run_update(w: Original) -> None:
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


def cli_generate_update(w: Original) -> None:
    _cli(w, "generate", "circle", DET, NAME, "--center", "50", "60", "--radius", "5", "--update")
    _new_version(w, w.registry.get_mask_uid(DET, NAME))


def cli_activate(w: Original) -> None:
    _cli(w, "activate", DET, NAME, "--note", "from the command line")
    assert w.registry.active_set(DET).names == (NAME,)


def cli_activate_none(w: Original) -> None:
    _cli(w, "activate", DET, "--none")
    assert w.registry.active_set(DET).names == ()


def cli_composite_with_picture(w: Original) -> None:
    before = _versions(w)
    _cli(w, "composite", DET, NAME, "--png", str(w.scratch / "composite.png"))
    assert _versions(w) == before


def cli_export(w: Original) -> None:
    _cli(w, "export", DET, NAME, str(w.scratch / "export.edf"), "--uid", w.uid)
    from chx_masks.io import read_mask

    np.testing.assert_array_equal(read_mask(w.scratch / "export.edf")[0], w.original)


def cli_delete_declined(w: Original) -> None:
    before = _versions(w)
    _cli(w, "delete", DET, NAME, input="n\n", code=1)
    assert _versions(w) == before


def cli_delete(w: Original) -> None:
    _cli(w, "delete", DET, NAME, "--yes")
    assert (DET, NAME) not in w.registry.get_masks()


def cli_register_after_retire(w: Original) -> None:
    _cli(w, "register", DET, NAME, str(w.npy("again.npy", w.original)))
    _new_version(w, w.registry.get_mask_uid(DET, NAME))


WRITE_PATHS: list[tuple[str, Callable[[Original], None]]] = [
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
    """The rows per surface and the write paths tried, in pytest's terminal summary."""
    ids = Counter(p.values[0].surface for p in PARAMS)
    counts = SUMMARY.setdefault("test_refusals: cases per surface", {})
    for surface, count in SURFACES.items():
        counts[surface] = (
            f"{count} cases, {ids[surface]} test ids ({KNOWN_BUGS[surface]} marked as known bugs)"
        )
    counts["total"] = f"{sum(SURFACES.values())} cases, {len(PARAMS)} test ids"
    kinds = Counter(label.split("_", 1)[0] for label, _ in WRITE_PATHS)
    SUMMARY.setdefault("test_refusals: write paths tried", {})[
        f"{len(WRITE_PATHS)} write paths"
    ] = ", ".join(f"{kind} {count}" for kind, count in kinds.items())


def test_every_write_path_leaves_the_original_version_unchanged(original: Original) -> None:
    """The steps run in order on one registry; each failing one is reported by name."""
    first = fingerprint(original)
    assert first["mask_sha256"] == mask_sha256(original.original)
    assert first["record"]["metadata"] == METADATA
    assert first["record"]["version"] == 0
    failures = []
    for label, step in WRITE_PATHS:
        try:
            step(original)
        except Exception as exc:  # the step's own outcome was wrong
            failures.append(f"[{label}] {type(exc).__name__}: {exc}")
        now = fingerprint(original)
        changed = sorted(k for k in first if now[k] != first[k])
        if changed:
            failures.append(f"[{label}] changed the original version: {changed}")
            first = now  # judge the next step on its own
    assert not failures, "\n".join(failures)
    versions = [v for v, _ in _versions(original)]
    assert versions[0] == 0 and _versions(original)[0][1] == original.uid
    assert versions == sorted(set(versions)), versions  # no version number twice


# ------------------------------------------------------------ changed under the registry


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
    seen = fingerprint(Original(registry, embedded_dir, tmp_path, uid, mask))
    assert seen["mask_sha256"] == "refused: MaskIntegrityError"


def test_fingerprint_sees_metadata_rewritten_through_the_raw_tiled_client(
    stored: Stored, embedded_dir: Path, tmp_path: Path
) -> None:
    """The write-path test's check itself: a changed metadata value shows."""
    registry, uid, mask = stored
    world = Original(registry, embedded_dir, tmp_path, uid, mask)
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


# ------------------------------------------------------------ accepted input


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_of_lists_of_bools_is_accepted(worlds: Worlds, backend: str) -> None:
    registry = worlds.get("scratch", backend).registry
    rows = random_mask(seed=3).tolist()
    uid = registry.register_mask(DET, "from_lists", rows)
    back = registry.get_mask(DET, "from_lists").compute()
    assert back.dtype == np.bool_
    np.testing.assert_array_equal(back, np.array(rows))
    assert registry.describe(uid).masked_pixels == int((~np.array(rows)).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_mask_accepted_with_allow_binary(worlds: Worlds, backend: str) -> None:
    registry = worlds.get("scratch", backend).registry
    mask = random_mask(seed=4)
    for dtype in (np.uint8, np.int32, np.float32, np.float64):
        name = f"binary_{np.dtype(dtype).name}"
        uid = registry.register_mask(DET, name, mask.astype(dtype), allow_binary=True)
        back = registry.get_mask(DET, name).compute()
        assert back.dtype == np.bool_, dtype
        np.testing.assert_array_equal(back, mask, err_msg=str(dtype))  # 1 = kept
        assert registry.describe(uid).masked_pixels == int((~mask).sum())


def test_metadata_at_the_edges_reads_back_exactly_from_the_embedded_catalog(embedded_dir):
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


@pytest.mark.slow
def test_the_malformed_input_table_on_the_embedded_registry(embedded_dir):
    """Every case of tests/input_table.py: a ChxMasksError and nothing written, or kept.

    Over HTTP, the same table runs on a deployed server with each catalog
    (``test_server.py::test_the_malformed_input_table_on_every_catalog``).
    """
    import input_table

    with MaskRegistry.embedded(embedded_dir) as registry:
        registry.register_mask(DET, "base", random_mask(seed=1))
        shape = registry.get_detector(DET).shape
        counts, problems = input_table.run(registry, DET, "base", shape)
    SUMMARY.setdefault("malformed-input cases (embedded registry)", {})["outcomes"] = counts
    assert sum(counts.values()) >= 155
    assert problems == []
