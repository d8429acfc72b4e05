"""Refusals across three surfaces: the Python API, the ``chx-masks`` command and the preprocessor.

One table, one test. Every case is a bad input, and every case checks three things:

(a) how it is refused: the specific exception class (and the builtin it also
    is) for the API and the preprocessor; exit status 1 and exactly one line,
    ``chx-masks: ...``, for the command line;
(b) that the message names the offending value (the name, shape, dtype, key,
    uid, file...);
(c) that nothing was written: ``test_bad_input.snapshot`` (public listings
    with retired lineages, detectors, the keys of the tiled tree, the data
    files), the active sets, every row of tiled's catalog (nodes with their
    metadata: mask records, slots, active-set versions), the sha256 of every
    file under the embedded registry's ``data/`` and of the array of every
    uid, read straight from tiled. A case is refused with exactly the class
    named (not a subclass), which is a ``ChxMasksError`` and the builtin it
    resembles.

The registry is one embedded registry for the module. The command runs through
click's ``CliRunner`` on ``chx_masks._cli.main`` with ``--dir`` pointing at that
same directory (a second in-process tiled on the same catalog, as a second
process would). The preprocessor runs in a real RunEngine with a simulated
ophyd detector (``bluesky_callbacks.sim.SimEiger``); refused runs must emit no
document at all.

A case that shows a library bug is marked ``xfail(strict=True)`` with the
function at fault in its reason, so the table keeps passing until the fix
lands and then says the mark must go. The count of cases per surface is
printed in pytest's terminal summary.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import SUMMARY
from test_bad_input import BUILTIN, _changes, snapshot

from bluesky_callbacks import MaskProvenance
from bluesky_callbacks.sim import SimEiger
from chx_masks import (
    ChxMasksError,
    DetectorNotFoundError,
    MaskExistsError,
    MaskNotFoundError,
    MaskRegistry,
    MaskValidationError,
)
from chx_masks._cli import main

DET = "eiger500K_single_image"  # a built-in Eiger, for content checks
SHAPE = (514, 1030)
TINY = "tiny_image"  # a registered detector holding the lineages (small arrays)
TINY_DEVICE = "tiny"  # its simulated ophyd device (data key f"{name}_image")
TINY_SHAPE = (6, 8)
UNKNOWN = "pilatus_nowhere_image"
UNKNOWN_DEVICE = "pilatus_nowhere"
NO_SUCH_UID = "0b7d2f0e-9a53-4b7e-8a3c-2b9f2c1d0e4f"
LONG_NAME = "x" * 300

Surface = str  # "api" | "cli" | "preprocessor"
Fragment = str | Callable[["World"], str]


# ------------------------------------------------------------------ the world


@dataclass
class World:
    """The module's registry, its input files, a RunEngine and the last known state."""

    registry: MaskRegistry
    directory: Path
    files: Path
    cache: Path
    uids: dict[str, str]
    RE: Any
    baseline: dict[str, Any] | None = None
    docs: list[tuple[str, dict]] = field(default_factory=list)

    def file(self, name: str) -> Path:
        return self.files / name


def _write_inputs(files: Path) -> None:
    """The mask files the command-line cases read, good and bad."""
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


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One embedded registry: lineages, a superseded and a retired version, an active set."""
    from bluesky import RunEngine

    top = tmp_path_factory.mktemp("refusals")
    registry = MaskRegistry.embedded(top / "registry", disk_cache=False)
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
    yield World(registry, top / "registry", top / "files", top / "cache", uids, engine)
    _close_run_engine(engine)
    registry.close()


# ------------------------------------------------------------------ the state


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


def _catalog(world: World) -> dict[str, list[tuple]]:
    """Every row of the embedded registry's catalog (read-only, beside tiled)."""
    database = world.directory / "catalog.db"
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
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


def registry_state(world: World) -> dict[str, Any]:
    """``test_bad_input.snapshot`` plus the catalog, active sets and content hashes."""
    registry = world.registry
    state = snapshot(registry)
    state["catalog"] = _catalog(world)
    state["active_sets"] = registry.active_sets()
    masks = registry._root["masks"]
    # Straight from tiled, not through the registry's caches.
    state["arrays"] = {uid: _digest(np.asarray(node.read())) for uid, node in masks.items()}
    state["file_sha256"] = _file_sha256(world)
    return state


def _file_sha256(world: World) -> dict[str, str]:
    """The sha256 of every file under the embedded registry's ``data/``."""
    data = world.directory / "data"
    return {
        str(path.relative_to(data)): _digest(path.read_bytes())
        for path in sorted(data.rglob("*"))
        if path.is_file()
    }


# ---------------------------------------------------------------- the surfaces


@dataclass(frozen=True)
class Case:
    """One bad input on one surface, and what its refusal must say."""

    surface: Surface
    call: Callable[[World], Any] | None = None  # api / preprocessor
    args: tuple[str, ...] = ()  # cli; "@name" is a file of World.files
    error: type[Exception] | None = None  # None: a run that opens and records
    fragments: tuple[Fragment, ...] = ()
    verify: Callable[[World, Any], str | None] | None = None
    progress_line_ok: bool = True  # cli: tolerate click's progress-bar label


def _text(world: World, fragment: Fragment) -> str:
    return fragment(world) if callable(fragment) else fragment


def _refusal_problem(
    error: type[Exception], call: Callable[[], Any], fragments: list[str]
) -> str | None:
    """What is wrong with how ``call`` is refused, or None if it is refused right."""
    try:
        call()
    except Exception as exc:
        wrong = []
        if type(exc) is not error:
            wrong.append(f"raised {type(exc).__name__}, not {error.__name__}")
        if not isinstance(exc, ChxMasksError):
            wrong.append("not a ChxMasksError")
        if error in BUILTIN and not isinstance(exc, BUILTIN[error]):
            wrong.append(f"not a {BUILTIN[error].__name__}")
        missing = [f for f in fragments if f not in str(exc)]
        if missing:
            wrong.append(f"message lacks {missing}")
        return f"{'; '.join(wrong)} (message: {str(exc)!r})" if wrong else None
    return f"did not raise {error.__name__}"


def _python_problem(world: World, case: Case) -> str | None:
    assert case.call is not None
    fragments = [_text(world, f) for f in case.fragments]
    if case.error is not None:
        world.docs = []
        problem = _refusal_problem(case.error, lambda: case.call(world), fragments)
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


# --------------------------------------------------------------------- the table


def api(
    label: str,
    error: type[Exception],
    call: Callable[[World], Any],
    *fragments: Fragment,
    bug: str | None = None,
) -> Any:
    return _param("api", label, Case("api", call=call, error=error, fragments=fragments), bug)


def cli(
    label: str,
    args: tuple[str, ...],
    *fragments: Fragment,
    bug: str | None = None,
    progress_line_ok: bool = True,
) -> Any:
    case = Case("cli", args=args, fragments=fragments, progress_line_ok=progress_line_ok)
    return _param("cli", label, case, bug)


def pre(
    label: str,
    error: type[Exception] | None,
    call: Callable[[World], Any],
    *fragments: Fragment,
    verify: Callable[[World, Any], str | None] | None = None,
    bug: str | None = None,
) -> Any:
    case = Case("preprocessor", call=call, error=error, fragments=fragments, verify=verify)
    return _param("preprocessor", label, case, bug)


def _param(surface: Surface, label: str, case: Case, bug: str | None) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(case, id=f"{surface}: {label}", marks=marks)


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


class _Opaque:
    """An object JSON cannot hold."""


OVERSIZED = {"notes": "x" * (16 << 20)}  # 16 MiB of metadata for one mask


CASES = [
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
        lambda w: w.registry.get_mask_uid(TINY, "base", as_of="2000-01-01T00:00:00+00:00"),
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

SURFACES = Counter(param.values[0].surface for param in CASES)
KNOWN_BUGS = Counter(param.values[0].surface for param in CASES if param.marks)


@pytest.fixture(scope="module", autouse=True)
def _print_counts() -> None:
    """The cases per surface, in pytest's terminal summary."""
    counts = SUMMARY.setdefault("test_refusals: cases per surface", {})
    for surface, count in SURFACES.items():
        counts[surface] = f"{count} cases ({KNOWN_BUGS[surface]} marked as known bugs)"
    counts["total"] = f"{sum(SURFACES.values())} cases"


def test_the_table_spans_three_surfaces() -> None:
    assert set(SURFACES) == {"api", "cli", "preprocessor"}
    assert sum(SURFACES.values()) >= 30


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_and_writes_nothing(world: World, case: Case) -> None:
    # The state after the previous case is this case's state before: nothing
    # but these cases touches the module's registry.
    before = world.baseline if world.baseline is not None else registry_state(world)
    if case.surface == "cli":
        problem = _cli_problem(world, case)
    else:
        problem = _python_problem(world, case)
    after = registry_state(world)
    world.baseline = after
    wrote = _changes(before, after)
    if wrote:
        problem = f"{problem + '; ' if problem else ''}wrote: {_summary(wrote)}"
    assert problem is None, problem


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


def test_harness_sees_a_changed_byte_and_a_write(world: World) -> None:
    """The state check itself: one flipped byte of one array file, or a new node, shows.

    Runs after the table (it writes to the module's registry).
    """
    state = registry_state(world)
    assert _changes(state, registry_state(world)) == {}
    target = next(p for p in sorted((world.directory / "data").rglob("0")) if p.is_file())
    original = target.read_bytes()
    target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        flipped = _file_sha256(world)
    finally:
        target.write_bytes(original)
    assert flipped != state["file_sha256"]
    assert _changes(state, registry_state(world)) == {}
    world.registry.register_detector("harness_image", (2, 2))
    world.baseline = None
    assert {"catalog", "detector_records"} <= set(_changes(state, registry_state(world)))
