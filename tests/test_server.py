"""The registry on real tiled servers: `chx-masks serve`, keys and scopes, many writers.

Every server here is a `chx-masks serve` process on loopback, on two catalog
backends: SQLite, and PostgreSQL (fresh databases for the session, dropped at
its end; skipped, with the reason, where no PostgreSQL answers). For each
backend one server runs the shared deployment's configuration,
``deploy/tiled-config.yml`` (accounts, API keys with scopes, the replay
exporter) and serves every test of the module that needs it; an admin makes
a read-only key and a writer key for it as deploy/README.md says.

The concurrency tests use one crew of worker processes per backend (spawned
once: importing tiled takes seconds): 8 writers and 1 reader, separate
clients of the server, released together by a barrier for each round. The
figures they measure are printed at the end of the module.
"""

from __future__ import annotations

import gc
import json
import logging
import secrets
import signal
import subprocess
import sys
import time
import traceback
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import metadata_cases
import numpy as np
import pytest
import servers
from click.testing import CliRunner
from helpers import SUMMARY

import chx_masks
from chx_masks import (
    DetectorNotFoundError,
    MaskExistsError,
    MaskIntegrityError,
    MaskInUseError,
    MaskNotFoundError,
    MaskPermissionError,
    MaskRegistry,
    MaskValidationError,
    mask_sha256,
)
from chx_masks._cli import main

pytestmark = [pytest.mark.server, pytest.mark.slow]

DET = servers.DETECTOR
WRITERS = 8
READER = WRITERS  # the crew's last worker
ADMIN = "chx_admin"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Local copies of arrays go to the test's directory, never the user's cache."""
    monkeypatch.setenv("CHX_MASKS_CACHE_DIR", str(tmp_path / "mask-cache"))


@dataclass
class Deployment:
    backend: str
    server: servers.ServeProcess
    uri: str
    storage: Path
    reader_key: str
    writer_key: str
    secrets: tuple[str, ...]  # everything that must never be shown or logged
    admin_password: str = ""  # of the ADMIN account (tiled_admins)

    def registry(self, key: str | None) -> MaskRegistry:
        """A registry on the server with empty caches: every read is a request."""
        return MaskRegistry.from_uri(self.uri, api_key=key, disk_cache=False)


@pytest.fixture(scope="module")
def deployed(backend, request, tmp_path_factory):
    """`chx-masks serve --config deploy/tiled-config.yml` on this backend, with keys."""
    directory = tmp_path_factory.mktemp(f"deployed-{backend}")
    if backend == "postgresql":
        pg = request.getfixturevalue("postgres")
        catalog, auth = pg.create("deployed_catalog"), pg.create("deployed_auth")
        tables = pg.create("deployed_tables", driver="postgresql")
    else:
        catalog, auth, tables = (
            f"sqlite:///{directory / name}" for name in ("catalog.db", "auth.db", "tables.db")
        )
    password, signing = secrets.token_hex(12), secrets.token_hex(32)
    env = servers.clean_environment(
        CHX_MASKS_CATALOG_URI=catalog,
        CHX_MASKS_AUTH_DB_URI=auth,
        CHX_MASKS_STORAGE=str(directory),
        CHX_MASKS_TABLES_URI=tables,
        CHX_MASKS_SECRET_KEY=signing,
        CHX_MASKS_ADMIN_PASSWORD=password,
    )
    server = servers.ServeProcess(
        ["--config", str(servers.DEPLOY_CONFIG)], directory=directory, env=env
    )
    keys: list[str] = []
    try:
        for scopes, note in (
            (servers.READ_SCOPES, "chx-masks read-only"),
            (servers.WRITE_SCOPES, "chx-masks writer"),
        ):
            keys.append(servers.create_service_key(server.uri, ADMIN, password, scopes, note))
        yield Deployment(
            backend,
            server,
            server.uri,
            directory,
            *keys,
            secrets=(*keys, password, signing),
            admin_password=password,
        )
    finally:
        code = server.stop()
    assert code == 0, server.log
    for secret in (*keys, password, signing):
        assert secret not in server.log and secret not in server.stdout


@pytest.fixture(scope="module")
def crew(deployed, tmp_path_factory):
    """8 writer processes (writer key) and 1 reader process (read-only key)."""
    started = time.monotonic()
    crew = servers.Crew.start(
        deployed.uri,
        [deployed.writer_key] * WRITERS + [deployed.reader_key],
        tmp_path_factory.mktemp("crew-cache"),
    )
    figures = _figures(deployed.backend)
    figures["crew start (s)"] = round(time.monotonic() - started, 1)
    # A first write in a new process imports and connects what writing needs
    # (seconds, 9 processes on 2 cores): do it here, so the races time the race.
    started = time.monotonic()
    names = [unique(f"warm-up-{w}") for w in range(WRITERS)]
    commands = {w: ("register", names[w], w) for w in range(WRITERS)}
    commands[READER] = ("poll", names, list(range(WRITERS)))
    warm = crew.round(commands, until_done=set(range(WRITERS)))
    assert all(r.outcome == "ok" for r in warm), [(r.index, r.outcome, r.value) for r in warm]
    figures["crew warm-up (s)"] = round(time.monotonic() - started, 1)
    yield crew
    assert crew.close() == [0] * (WRITERS + 1)


def _figures(backend: str) -> dict[str, Any]:
    """The figures of this module on one catalog, printed in pytest's terminal summary."""
    return SUMMARY.setdefault(f"chx-masks server figures ({backend} catalog)", {})


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def mask_uids(registry: MaskRegistry) -> set[str]:
    """Every array under masks/ (registered or not), straight from tiled."""
    root = registry._root
    return set(root["masks"]) if "masks" in root else set()


def full_text(err: BaseException) -> str:
    """The error with its chain and traceback: all a user or a log could see."""
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))


def assert_no_secret(deployed: Deployment, *texts: str) -> None:
    for secret in deployed.secrets:
        for text in texts:
            assert secret not in text
            assert secret[:12] not in text  # nor a recognisable part of it


# ----------------------------------------------- authentication and scopes


def _anonymous_registry(uri: str) -> dict[str, str]:
    """MaskRegistry.from_uri(uri) with no key, as a script without a terminal runs it."""
    code = (
        "import json, sys\n"
        "from chx_masks import MaskRegistry\n"
        "try:\n"
        "    MaskRegistry.from_uri(sys.argv[1]).get_masks()\n"
        "except BaseException as err:\n"
        "    print(json.dumps({'type': type(err).__name__, 'message': str(err)}))\n"
        "else:\n"
        "    print(json.dumps({'type': None, 'message': 'allowed'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, uri],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        env=servers.clean_environment(),
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_anonymous_access_is_refused(deployed):
    writer = deployed.registry(deployed.writer_key)
    uid = writer.register_mask(DET, unique("anon"), servers.numbered_mask(3))
    writer.close()
    with httpx.Client(base_url=deployed.uri, trust_env=False) as http:
        for path in (
            "/metadata/",
            "/metadata/masks",
            f"/metadata/masks/{uid}",
            f"/array/full/masks/{uid}",
            "/search/masks",
        ):
            assert http.get(path).status_code == 401, path
    refused = _anonymous_registry(deployed.uri)
    assert refused["type"] is not None, "an anonymous client was let in"
    assert "API key" in refused["message"], refused


def test_anonymous_registry_raises_mask_permission_error(deployed):
    assert _anonymous_registry(deployed.uri)["type"] == "MaskPermissionError"


def _writes(registry: MaskRegistry, name: str) -> dict[str, Any]:
    return {
        "register_mask": lambda: registry.register_mask(
            DET, unique("new"), servers.numbered_mask(5)
        ),
        "update_mask": lambda: registry.update_mask(DET, name, servers.numbered_mask(6)),
        "delete_mask": lambda: registry.delete_mask(DET, name),
        "activate": lambda: registry.activate(DET, [name], note="reader tries"),
        "register_detector": lambda: registry.register_detector(unique("pilatus"), (43, 31)),
    }


def _state(registry: MaskRegistry, name: str) -> Any:
    root = registry._root
    return (
        sorted(mask_uids(registry)),
        sorted(root["detectors"]),
        [r.uid for r in registry.history(DET, name)],
        registry.active_set(DET),
    )


def test_read_only_key_reads_and_every_write_is_refused(deployed, caplog):
    caplog.set_level(logging.DEBUG)
    name = unique("readable")
    writer = deployed.registry(deployed.writer_key)
    uid0 = writer.register_mask(DET, name, servers.numbered_mask(1), metadata={"sample": "silica"})
    uid1 = writer.update_mask(DET, name, servers.numbered_mask(2))

    reader = MaskRegistry.from_uri(deployed.uri, api_key=deployed.reader_key)
    assert (DET, name) in reader.get_masks()
    assert reader.get_mask_uid(DET, name) == uid1
    np.testing.assert_array_equal(reader.get_mask(DET, name).compute(), servers.numbered_mask(2))
    np.testing.assert_array_equal(reader.get_mask_by_uid(uid0).compute(), servers.numbered_mask(1))
    assert [r.version for r in reader.history(DET, name)] == [0, 1]
    assert [r.uid for r in reader.search(metadata={"sample": "silica"}) if r.name == name] == [uid1]
    assert reader.resolve_composite(DET, [name]).uids == (uid1,)

    before = _state(writer, name)
    refusals = {}
    for call, attempt in _writes(reader, name).items():
        with pytest.raises(MaskPermissionError) as info:
            attempt()
        message = str(info.value)
        refusals[call] = message
        assert "refused" in message and deployed.uri in message, (call, message)
        assert "write:data" in message and "CHX_MASKS_API_KEY" in message, (call, message)
        assert_no_secret(deployed, message, repr(info.value), full_text(info.value))
    assert _state(writer, name) == before, "a refused write changed the registry"
    assert_no_secret(
        deployed,
        repr(reader),
        reader.location,
        caplog.text,
        *(r.getMessage() for r in caplog.records),
    )
    reader.close()
    writer.close()


def test_refusal_names_the_missing_scopes(deployed):
    reader = MaskRegistry.from_uri(deployed.uri, api_key=deployed.reader_key)
    with pytest.raises(MaskPermissionError) as info:
        reader.register_detector(unique("pilatus"), (43, 31))
    reader.close()
    assert "create:node" in str(info.value)


def _nan_mask() -> np.ndarray:
    values = np.ones(servers.SHAPE)
    values[3, 3] = np.nan
    return values


# (label, error, call(registry, name of an existing lineage), text the message must hold)
BAD_INPUTS = [
    (
        "wrong shape",
        MaskValidationError,
        lambda r, n: r.register_mask(DET, unique("m"), np.ones((3, 4), bool)),
        "3x4",
    ),
    (
        "transposed",
        MaskValidationError,
        lambda r, n: r.update_mask(DET, n, np.ones(servers.SHAPE[::-1], bool)),
        "1030x514",
    ),
    (
        "NaN",
        MaskValidationError,
        lambda r, n: r.register_mask(DET, unique("m"), _nan_mask(), allow_binary=True),
        "NaN",
    ),
    (
        "path separator in a name",
        MaskValidationError,
        lambda r, n: r.register_mask(DET, "a/b", servers.numbered_mask(1)),
        "'a/b'",
    ),
    (
        "newline in a name",
        MaskValidationError,
        lambda r, n: r.register_mask(DET, "a\nb", servers.numbered_mask(1)),
        repr("a\nb"),
    ),
    (
        "reserved metadata key",
        MaskValidationError,
        lambda r, n: r.update_mask(DET, n, servers.numbered_mask(1), metadata={"uid": "x"}),
        "'uid'",
    ),
    (
        "oversized metadata",
        MaskValidationError,
        lambda r, n: r.update_mask(
            DET, n, servers.numbered_mask(1), metadata={"blob": "x" * 300_000}
        ),
        "'blob'",
    ),
    (
        "unknown detector",
        DetectorNotFoundError,
        lambda r, n: r.register_mask("pilatus_nowhere_image", "m", servers.numbered_mask(1)),
        "pilatus_nowhere_image",
    ),
    (
        "unknown uid",
        MaskNotFoundError,
        lambda r, n: r.get_mask_by_uid("00000000-0000-4000-8000-000000000000"),
        "00000000-0000-4000-8000-000000000000",
    ),
    (
        "missing version",
        MaskNotFoundError,
        lambda r, n: r.get_mask(DET, n, version=9),
        "no version 9",
    ),
    (
        "bad as_of",
        MaskValidationError,
        lambda r, n: r.get_mask_uid(DET, n, as_of="yesterday"),
        "'yesterday'",
    ),
    (
        "register an existing name",
        MaskExistsError,
        lambda r, n: r.register_mask(DET, n, servers.numbered_mask(1)),
        "<name>",
    ),
]


def _refusal_problem(label: str, error: type[Exception], fragment: str, call) -> str | None:
    """What is wrong with how ``call`` is refused (``error`` naming ``fragment``), or None."""
    try:
        call()
    except error as err:
        return None if fragment in str(err) else f"{label}: message lacks {fragment!r}: {err}"
    except Exception as err:
        return f"{label}: {type(err).__name__} instead of {error.__name__}: {err}"
    return f"{label}: not refused"


def test_metadata_at_the_edges_reads_back_exactly_or_is_refused_on_every_catalog(deployed):
    """What a writer registers reads back equal from SQLite and PostgreSQL, or is refused.

    PostgreSQL turns 1e20 into the integer 100000000000000000000 and cannot
    serve integers past 2**64 at all: such values must never be stored.
    """
    writer = deployed.registry(deployed.writer_key)
    reader = deployed.registry(deployed.reader_key)
    prefix = unique("edge")
    uids = {
        label: writer.register_mask(
            DET, f"{prefix}-{i}", servers.numbered_mask(50 + i), metadata=md
        )
        for i, (label, md) in enumerate(metadata_cases.KEPT)
    }
    changed = {
        label: dict(reader.describe(uids[label]).metadata)
        for label, md in metadata_cases.KEPT
        if dict(reader.describe(uids[label]).metadata) != md
    }
    found = reader.search(metadata={"n": 2**63 - 1})
    before = _state(writer, f"{prefix}-0")
    failures = [
        problem
        for label, md, fragment in metadata_cases.REFUSED
        if (
            problem := _refusal_problem(
                label,
                MaskValidationError,
                fragment,
                lambda md=md: writer.register_mask(
                    DET, f"{prefix}-refused", servers.numbered_mask(1), metadata=md
                ),
            )
        )
    ]
    assert _state(writer, f"{prefix}-0") == before
    with pytest.raises(MaskNotFoundError):
        reader.get_mask_uid(DET, f"{prefix}-refused")
    writer.close()
    reader.close()
    assert not changed, changed
    assert not failures, "\n".join(failures)
    assert [r.uid for r in found] == [uids["int64 max"]]
    _figures(deployed.backend)["metadata edge cases kept / refused"] = (
        f"{len(metadata_cases.KEPT)} / {len(metadata_cases.REFUSED)}"
    )


def test_bad_input_on_the_shared_server_is_refused_and_writes_nothing(deployed):
    """Bad inputs against the deployed server (SQLite and PostgreSQL catalogs)."""
    writer = deployed.registry(deployed.writer_key)
    name = unique("kept")
    uid = writer.register_mask(DET, name, servers.numbered_mask(40), metadata={"sample": "a"})
    digest = mask_sha256(servers.numbered_mask(40))
    failures = []
    for label, error, call, fragment in BAD_INPUTS:
        fragment = name if fragment == "<name>" else fragment
        before = _state(writer, name)
        problem = _refusal_problem(label, error, fragment, lambda call=call: call(writer, name))
        if problem:
            failures.append(problem)
        if _state(writer, name) != before:
            failures.append(f"{label}: the registry changed")
    fresh = deployed.registry(deployed.reader_key)
    assert mask_sha256(fresh.get_mask_by_uid(uid).compute()) == digest
    assert fresh.describe(uid).metadata == {"sample": "a"}
    fresh.close()
    writer.close()
    assert not failures, "\n".join(failures)
    _figures(deployed.backend)["bad inputs refused, registry unchanged"] = len(BAD_INPUTS)


def test_the_malformed_input_table_on_every_catalog(deployed):
    """Every case of tests/input_table.py: a ChxMasksError and nothing written, or kept."""
    import input_table

    writer = deployed.registry(deployed.writer_key)
    base = unique("table-base")
    writer.register_mask(DET, base, servers.numbered_mask(500))
    counts, problems = input_table.run(writer, DET, base, servers.SHAPE)
    writer.close()
    _figures(deployed.backend)["malformed-input cases: outcomes"] = counts
    assert sum(counts.values()) >= 155
    assert problems == []


def test_writer_key_registers_updates_activates_and_retires(deployed):
    writer = MaskRegistry.from_uri(deployed.uri, api_key=deployed.writer_key)
    name = unique("beamstop")
    detector = unique("pilatus")
    assert writer.register_detector(detector, (43, 31)).shape == (43, 31)
    uid0 = writer.register_mask(DET, name, servers.numbered_mask(7))
    uid1 = writer.update_mask(DET, name, servers.numbered_mask(8), metadata={"why": "moved"})
    assert writer.activate(DET, [name], note="sample B").names == (name,)
    with pytest.raises(MaskExistsError):
        writer.register_mask(DET, name, servers.numbered_mask(7))
    with pytest.raises(MaskInUseError):
        writer.delete_mask(DET, name)
    last = writer.delete_mask(DET, name, force=True)
    assert (last.uid, last.version) == (uid1, 1)
    assert name not in writer.active_set(DET).names
    # Every change records whose key made it: a service principal, with its key's note.
    assert writer.identity.startswith("service principal ") and "(key '" in writer.identity
    assert writer.describe(uid0).created_by == writer.identity
    assert writer.active_set(DET).created_by == writer.identity

    reader = deployed.registry(deployed.reader_key)
    assert (DET, name) not in reader.get_masks()
    with pytest.raises(MaskNotFoundError):
        reader.get_mask_uid(DET, name)
    for uid, i in ((uid0, 7), (uid1, 8)):  # retired, and readable forever
        np.testing.assert_array_equal(
            reader.get_mask_by_uid(uid).compute(), servers.numbered_mask(i)
        )
    assert detector in {d.name for d in reader.detectors()}
    assert writer.register_mask(DET, name, servers.numbered_mask(9)) != uid0
    assert [r.version for r in reader.history(DET, name)] == [0, 1, 3]
    writer.close()
    reader.close()


def _refused_connection(uri: str, key: str) -> str:
    """The full text of the MaskPermissionError that connecting with ``key`` raises.

    The refused connection must be closed, not left for the garbage collector
    (it would surface later as a ResourceWarning).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        try:
            MaskRegistry.from_uri(uri, api_key=key).get_masks()
        except MaskPermissionError as err:
            text = full_text(err)
        else:
            text = ""
        gc.collect()
    assert text, "a wrong key was let in"
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks
    return text


def test_keys_stay_out_of_reprs_messages_and_logs(deployed, caplog):
    wrong = secrets.token_hex(32)  # before logs are captured: records would keep it alive
    bad_key = _refused_connection(deployed.uri, wrong)
    assert "HTTP 401" in bad_key and wrong not in bad_key

    caplog.set_level(logging.DEBUG)
    reader = MaskRegistry.from_uri(deployed.uri, api_key=deployed.reader_key)
    reader.get_masks()
    with pytest.raises(MaskNotFoundError) as missing:
        reader.get_mask_by_uid(str(uuid.uuid4()))
    with pytest.raises(MaskPermissionError) as refused:
        reader.register_detector(unique("pilatus"), (4, 4))
    assert_no_secret(
        deployed,
        repr(reader),
        reader.location,
        full_text(missing.value),
        full_text(refused.value),
        bad_key,
    )
    reader.close()

    # A link with the key in it, as a browser sends it (urllib logs nothing here).
    from urllib.request import urlopen

    with urlopen(f"{deployed.uri}/metadata/?api_key={deployed.reader_key}") as response:
        assert response.status == 200
    time.sleep(0.5)  # the access log line of the last request
    assert_no_secret(
        deployed,
        caplog.text,
        *(r.getMessage() for r in caplog.records),
        deployed.server.log,
        deployed.server.stdout,
    )
    assert "api_key=***" in deployed.server.log  # that request was logged, redacted


def test_key_in_the_uri_stays_out_of_client_logs(deployed, caplog):
    caplog.set_level(logging.DEBUG)
    registry = MaskRegistry.from_uri(f"{deployed.uri}?api_key={deployed.reader_key}")
    registry.get_masks()
    assert_no_secret(deployed, repr(registry), registry.location)  # these hold already
    registry.close()
    assert_no_secret(deployed, caplog.text)


# ------------------------------------------------------------- concurrency


def _spread_ms(reports: list[servers.Report]) -> float:
    started = [r.started for r in reports if r.started is not None]
    return round(1000 * (max(started) - min(started)), 1)


def _writer_seconds(reports: list[servers.Report]) -> str:
    seconds = sorted(r.seconds for r in reports if r.seconds is not None)
    return f"{seconds[0]:.2f}..{seconds[-1]:.2f}"


def _check_reader(poll: servers.Report, writer_of: dict[str, int]) -> dict[str, Any]:
    """The reader saw no error and only whole masks, each the one its uid's writer wrote."""
    assert (poll.op, poll.outcome) == ("poll", "ok"), poll
    polled = poll.value
    assert polled["problems"] == [], polled["problems"][:3]
    assert polled["reads"] > 0, polled
    for uid, mask_index in polled["seen"].items():
        assert writer_of.get(uid) == mask_index, (uid, mask_index)
    return polled


def test_eight_processes_register_one_name_at_once(deployed, crew):
    registry = deployed.registry(deployed.reader_key)
    name = unique("race")
    before = mask_uids(registry)
    commands = {w: ("register", name, w) for w in range(WRITERS)}
    commands[READER] = ("poll", [name], list(range(WRITERS)))
    started = time.monotonic()
    reports = crew.round(commands, until_done=set(range(WRITERS)))
    seconds = time.monotonic() - started
    writers, poll = reports[:WRITERS], reports[READER]

    outcomes = Counter(r.outcome for r in writers)
    assert outcomes == {"ok": 1, "MaskExistsError": WRITERS - 1}, [
        (r.index, r.outcome, str(r.value)[:300]) for r in writers
    ]
    [winner] = [r for r in writers if r.outcome == "ok"]
    history = registry.history(DET, name)
    assert [(h.version, h.uid) for h in history] == [(0, winner.value)]
    assert [m for m in registry.get_masks(DET) if m[1] == name] == [(DET, name)]
    np.testing.assert_array_equal(
        registry.get_mask(DET, name).compute(), servers.numbered_mask(winner.index)
    )
    # The 7 losers' arrays, written before their claims were refused, are gone.
    orphans = mask_uids(registry) - before - {winner.value}
    assert orphans == set()
    polled = _check_reader(poll, {winner.value: winner.index})
    registry.close()
    _figures(deployed.backend).update(
        {
            "register race: writers released together": len(writers),
            "register race: start spread (ms)": _spread_ms(reports),
            "register race: lineages": len({h.uid for h in history if h.version == 0}),
            "register race: MaskExistsError": outcomes["MaskExistsError"],
            "register race: orphan arrays": len(orphans),
            "register race: writer call (s)": _writer_seconds(writers),
            "register race: reader look-ups during writes": polled["rounds"],
            "register race: whole-array reads during writes": polled["reads"],
            "register race: partial or bad reads": len(polled["problems"]),
            "register race (s)": round(seconds, 2),
        }
    )


def test_eight_processes_update_one_lineage_at_once(deployed, crew):
    registry = deployed.registry(deployed.reader_key)
    writer = deployed.registry(deployed.writer_key)
    name = unique("lineage")
    before = mask_uids(registry)
    uid0 = writer.register_mask(DET, name, servers.numbered_mask(100))
    commands = {w: ("update", name, w + 1) for w in range(WRITERS)}  # worker w writes mask w+1
    commands[READER] = ("poll", [name], [100, *range(1, WRITERS + 1)])
    started = time.monotonic()
    reports = crew.round(commands, until_done=set(range(WRITERS)))
    seconds = time.monotonic() - started
    writers, poll = reports[:WRITERS], reports[READER]

    assert all(r.outcome == "ok" for r in writers), [  # message and where it came from
        (r.index, r.outcome, str(r.value)[:600], str(r.value)[-1500:])
        for r in writers
        if r.outcome != "ok"
    ]
    writer_of = {uid0: 100, **{r.value: r.index + 1 for r in writers}}
    assert len(writer_of) == WRITERS + 1, "two writers got the same uid"

    history = registry.history(DET, name)
    assert [h.version for h in history] == list(range(WRITERS + 1))  # consecutive, no gap
    assert history[0].uid == uid0
    assert {h.uid for h in history} == set(writer_of)  # no update lost
    assert [h.active for h in history] == [False] * WRITERS + [True]
    for earlier, later in zip(history, history[1:], strict=False):
        assert earlier.superseded_at == later.registered_at
        assert earlier.registered_at < later.registered_at
    lost = 0
    for uid, i in writer_of.items():  # each uid holds exactly what its writer wrote
        if not np.array_equal(registry.get_mask_by_uid(uid).compute(), servers.numbered_mask(i)):
            lost += 1
    assert lost == 0
    orphans = mask_uids(registry) - before - set(writer_of)
    assert orphans == set()

    polled = _check_reader(poll, writer_of)
    version_of = {h.uid: h.version for h in history}
    seen_versions = [version_of[uid] for uid in polled["order"]]
    assert seen_versions == sorted(seen_versions), "the reader saw versions go backwards"
    registry.close()
    writer.close()
    _figures(deployed.backend).update(
        {
            "update race: writers released together": len(writers),
            "update race: start spread (ms)": _spread_ms(reports),
            "update race: versions created": len(history) - 1,
            "update race: versions": f"{history[0].version}..{history[-1].version}",
            "update race: distinct uids": len(writer_of) - 1,
            "update race: masks lost": lost,
            "update race: orphan arrays": len(orphans),
            "update race: writer call (s)": _writer_seconds(writers),
            "update race: reader look-ups during writes": polled["rounds"],
            "update race: whole-array reads during writes": polled["reads"],
            "update race: partial or bad reads": len(polled["problems"]),
            "update race: versions the reader saw": seen_versions,
            "update race (s)": round(seconds, 2),
        }
    )


# ---------------------------------------------------------------- integrity


def _registry_state(registry: MaskRegistry) -> dict[str, Any]:
    """A full listing, every history, every describe and every active set, as plain data."""
    lineages = registry.get_masks(include_retired=True)
    histories = {
        f"{det}/{name}": [repr(r) for r in registry.history(det, name)] for det, name in lineages
    }
    uids = sorted(mask_uids(registry))
    return {
        "lineages": lineages,
        "histories": histories,
        "described": {uid: repr(registry.describe(uid)) for uid in uids},
        "arrays": {uid: mask_sha256(registry.get_mask_by_uid(uid).compute()) for uid in uids},
        "active": {
            det: [repr(a) for a in registry.active_history(det)]
            for det in sorted({det for det, _ in lineages})
        },
        "detectors": sorted(d.name for d in registry.detectors()),
    }


def _write_attacks(deployed: Deployment, victim: dict[str, Any]) -> dict[str, Any]:
    """Every write path a writer key has through tiled, aimed at registered records.

    Each value sends one request with the writer key (raw HTTP, as any script
    could) and returns the response.
    """
    det, name, uid, other = victim["detector"], victim["name"], victim["uid"], victim["other"]
    slot, active = f"detectors/{det}/{name}@0", f"active/{det}/{victim['active']}"
    mask_md = victim["mask_md"]
    mask_bytes = (~victim["mask"]).tobytes()
    merge = "application/merge-patch+json"
    at = "2100-01-01T00:00:00+00:00"

    def slot_md(**change: Any) -> dict[str, Any]:
        return {
            "detector": det,
            "name": name,
            "version": victim["next"],
            "kind": "mask",
            "uid": other,
            "at": at,
            "created_by": "attacker",
            **change,
        }

    def create(parent: str, key: str, metadata: dict, spec: str) -> Any:
        return lambda h: h.post(
            f"/metadata/{parent}",
            json={
                "id": key,
                "structure_family": "container",
                "metadata": metadata,
                "specs": [{"name": spec}],
                "data_sources": [],
            },
        )

    def patch(path: str, **body: Any) -> Any:
        return lambda h: h.patch(
            f"/metadata/{path}", json={"content-type": merge, "specs": None, **body}
        )

    octet = {"Content-Type": "application/octet-stream"}
    return {
        "metadata update (merge patch) of a mask": patch(
            f"masks/{uid}", metadata={"sample": "forged"}
        ),
        "sha256 rewrite of a mask": patch(f"masks/{uid}", metadata={"sha256": "0" * 64}),
        "metadata replace (PUT) of a mask": lambda h: h.put(
            f"/metadata/masks/{uid}",
            json={"metadata": {**mask_md, "sample": "forged"}, "specs": [{"name": "chx_mask"}]},
        ),
        "spec removal of a mask": patch(f"masks/{uid}", specs=[]),
        "unsealing a mask": patch(f"masks/{uid}", metadata={"sealed": False}),
        "array write of a mask": lambda h: h.put(
            f"/array/full/masks/{uid}", content=mask_bytes, headers=octet
        ),
        "block write of a mask": lambda h: h.put(
            f"/array/block/masks/{uid}?block=0,0", content=mask_bytes, headers=octet
        ),
        "delete of a mask": lambda h: h.delete(
            f"/metadata/masks/{uid}", params={"external_only": False}
        ),
        "revision delete of a mask": lambda h: h.delete(
            f"/revisions/masks/{uid}", params={"number": 1}
        ),
        "metadata update of a slot": patch(slot, metadata={"uid": other}),
        "delete of a slot": lambda h: h.delete(f"/metadata/{slot}"),
        "detector shape rewrite": patch(f"detectors/{det}", metadata={"shape": [1, 1]}),
        "active set rewrite": patch(active, metadata={"names": [], "note": "forged"}),
        "delete of an active set": lambda h: h.delete(f"/metadata/{active}"),
        "registry container metadata rewrite": patch("masks", metadata={"chx_masks": 99}),
        "recursive delete of a detector": lambda h: h.delete(
            f"/metadata/detectors/{det}", params={"recursive": True, "external_only": False}
        ),
        "recursive delete of all detectors": lambda h: h.delete(
            "/metadata/detectors", params={"recursive": True, "external_only": False}
        ),
        "recursive delete of all masks": lambda h: h.delete(
            "/metadata/masks", params={"recursive": True, "external_only": False}
        ),
        "bogus slot: another lineage's mask as the next version": create(
            f"detectors/{det}", f"{name}@{victim['next']}", slot_md(), "chx_mask_slot"
        ),
        "bogus slot: a version out of sequence": create(
            f"detectors/{det}",
            f"{name}@{victim['next'] + 5}",
            slot_md(version=victim["next"] + 5, uid=uid),
            "chx_mask_slot",
        ),
        "bogus slot: a uid that does not exist": create(
            f"detectors/{det}",
            f"{name}@{victim['next']}",
            slot_md(uid=str(uuid.uuid4()), record_sha256="0" * 64),
            "chx_mask_slot",
        ),
        "bogus slot: back in time": create(
            f"detectors/{det}",
            f"{name}@{victim['next']}",
            slot_md(uid=uid, at="2000-01-01T00:00:00+00:00", record_sha256=victim["record"]),
            "chx_mask_slot",
        ),
        "bogus active set: a version out of sequence": create(
            f"active/{det}",
            str(victim["active"] + 3),
            {
                "detector": det,
                "version": victim["active"] + 3,
                "names": [],
                "note": "forged",
                "at": at,
            },
            "chx_mask_active_set",
        ),
        "bogus active set: another detector's": create(
            f"active/{det}",
            str(victim["active"] + 1),
            {
                "detector": "pilatus1m",
                "version": victim["active"] + 1,
                "names": [],
                "note": "forged",
                "at": at,
            },
            "chx_mask_active_set",
        ),
    }


def test_writer_key_cannot_rewrite_or_delete_the_registry_through_tiled(deployed):
    """Each write path of a writer key, through raw HTTP: 403, and nothing changes."""
    writer = deployed.registry(deployed.writer_key)
    name, other_name = unique("victim"), unique("bystander")
    mask = servers.numbered_mask(300)
    uid = writer.register_mask(DET, name, mask, metadata={"sample": "silica"})
    other = writer.register_mask(DET, other_name, servers.numbered_mask(301))
    writer.activate(DET, [name, other_name], note="before the attacks")
    node_md = dict(writer._root["masks"][uid].metadata)
    from chx_masks._content import record_sha256

    victim = {
        "detector": DET,
        "name": name,
        "uid": uid,
        "other": other,
        "mask": mask,
        "mask_md": node_md,
        "record": record_sha256(node_md),
        "next": 1,
        "active": writer.active_set(DET).version,
    }
    assert node_md["sealed"] is True
    writer.close()
    reader = deployed.registry(deployed.reader_key)
    before = _registry_state(reader)
    reader.close()

    outcomes = {}
    with httpx.Client(
        base_url=deployed.uri,
        trust_env=False,
        timeout=60,
        headers={"Authorization": f"Apikey {deployed.writer_key}"},
    ) as http:
        for label, attack in _write_attacks(deployed, victim).items():
            response = attack(http)
            outcomes[label] = response.status_code
            assert_no_secret(deployed, response.text)
    print(
        f"\n{deployed.backend}: {len(outcomes)} write attacks with a writer key:",
        dict(Counter(outcomes.values())),
    )
    assert {label: code for label, code in outcomes.items() if code != 403} == {}

    reader = deployed.registry(deployed.reader_key)
    after = _registry_state(reader)
    reader.close()
    assert after == before
    # The registry itself still writes through the same policy.
    writer = deployed.registry(deployed.writer_key)
    newer = writer.update_mask(DET, name, servers.numbered_mask(302))
    assert writer.describe(newer).version == 1
    writer.close()


def test_an_admin_key_purges_only_what_the_change_log_records(deployed):
    """An admin key: the writer's attack table is still refused; a purge is logged first.

    A writer's purge is refused before anything is written; an admin's raw
    delete without a purge record is refused (403); ``purge`` records who
    and why, then deletes; the uid then says it was purged; the rest of its
    lineage reads as before; the scrub is clean.
    """
    from chx_masks import MaskPermissionError, MaskPurgedError
    from chx_masks._verify import verify_registry

    writer = deployed.registry(deployed.writer_key)
    name = unique("purged")
    kept_mask, gone_mask = servers.numbered_mask(500), servers.numbered_mask(501)
    kept = writer.register_mask(DET, name, kept_mask)
    gone = writer.update_mask(DET, name, gone_mask)
    other = writer.register_mask(DET, unique("bystander"), servers.numbered_mask(502))
    writer.activate(DET, [name], note="before the purge")
    active = writer.active_set(DET).version
    last = writer.last_change()
    with pytest.raises(MaskPermissionError, match="admin:apikeys"):
        writer.purge(gone, reason="a writer tries")
    assert writer.last_change() == last
    writer.close()

    admin_key = servers.create_service_key(
        deployed.uri,
        ADMIN,
        deployed.admin_password,
        [*servers.WRITE_SCOPES, "admin:apikeys"],
        "chx-masks admin",
        role="admin",
    )
    reader = deployed.registry(deployed.reader_key)
    before = _registry_state(reader)
    node_md = dict(reader._root["masks"][gone].metadata)
    reader.close()
    from chx_masks._content import record_sha256

    victim = {
        "detector": DET,
        "name": name,
        "uid": gone,
        "other": other,
        "mask": gone_mask,
        "mask_md": node_md,
        "record": record_sha256(node_md),
        "next": 2,
        "active": active,
    }
    outcomes = {}
    with httpx.Client(
        base_url=deployed.uri,
        trust_env=False,
        timeout=60,
        headers={"Authorization": f"Apikey {admin_key}"},
    ) as http:
        for label, attack in _write_attacks(deployed, victim).items():
            outcomes[label] = attack(http).status_code
    print(
        f"\n{deployed.backend}: {len(outcomes)} write attacks with an admin key:",
        dict(Counter(outcomes.values())),
    )
    assert {label: code for label, code in outcomes.items() if code != 403} == {}
    reader = deployed.registry(deployed.reader_key)
    assert _registry_state(reader) == before
    reader.close()

    admin = deployed.registry(admin_key)
    record = admin.purge(gone, reason="uploaded the wrong file")
    assert (record.uid, record.version) == (gone, 1)
    admin.close()
    reader = deployed.registry(deployed.reader_key)
    with pytest.raises(MaskPurgedError, match="uploaded the wrong file") as caught:
        reader.get_mask_by_uid(gone)
    assert caught.value.purge["by"].startswith("service principal")
    assert caught.value.purge["sha256"] == record.sha256
    assert [r.version for r in reader.history(DET, name)] == [0, 1]
    assert np.array_equal(reader.get_mask_by_uid(kept).compute(), kept_mask)
    report = verify_registry(reader)
    assert report.problems == [] and report.counts["purged"] >= 1, report.to_dict()
    assert reader.last_change() == last + 1
    reader.close()
    assert_no_secret(deployed, record.created_by or "", str(caught.value))


def test_verify_is_clean_after_sixteen_concurrent_writers(deployed):
    """16 writers at once (new lineages, one shared lineage, active sets); then the scrub."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from chx_masks._verify import verify_registry

    shared = unique("shared")
    first = deployed.registry(deployed.writer_key)
    first.register_mask(DET, shared, servers.numbered_mask(400))
    first.close()
    # Sixteen writers on two cores: each may wait its turn for the catalog's
    # write lock (SQLite: one writer at a time) well past the default 10 s.
    writers = [
        MaskRegistry.from_uri(
            deployed.uri, api_key=deployed.writer_key, disk_cache=False, timeout=120
        )
        for _ in range(16)
    ]
    barrier = threading.Barrier(len(writers))

    def work(i: int) -> tuple[str, str]:
        registry = writers[i]
        barrier.wait()
        own = registry.register_mask(DET, unique(f"w{i}"), servers.numbered_mask(401 + i))
        newer = registry.update_mask(DET, shared, servers.numbered_mask(420 + i))
        registry.activate(DET, [shared], note=f"writer {i}")
        return own, newer

    with ThreadPoolExecutor(len(writers)) as pool:
        done = list(pool.map(work, range(len(writers))))
    for registry in writers:
        registry.close()
    reader = deployed.registry(deployed.reader_key)
    versions = sorted(r.version for r in reader.history(DET, shared))
    assert versions == list(range(17)), versions
    assert len({uid for pair in done for uid in pair}) == 32
    report = verify_registry(reader)
    reader.close()
    print(f"\n{deployed.backend}: verify after 16 writers: {report.counts}")
    assert report.problems == []
    cli = CliRunner().invoke(
        main,
        ["--uri", deployed.uri, "verify", "--json"],
        env={"CHX_MASKS_API_KEY": deployed.reader_key},
    )
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["clean"] is True


def test_array_changed_on_the_servers_disk_is_refused(deployed):
    writer = deployed.registry(deployed.writer_key)
    name_a, name_b = unique("damaged"), unique("intact")
    uid_a = writer.register_mask(DET, name_a, servers.numbered_mask(200))
    uid_b = writer.register_mask(DET, name_b, servers.numbered_mask(201))
    writer.close()

    def chunks(uid: str) -> dict[str, Path]:
        node = deployed.storage / "data" / "masks" / uid
        return {
            str(p.relative_to(node)): p
            for p in node.rglob("*")
            if p.is_file() and p.name != "zarr.json"
        }

    damaged, intact = chunks(uid_a), chunks(uid_b)
    assert damaged and damaged.keys() == intact.keys()
    # Valid chunks of another mask: the bytes decode, to the wrong pixels.
    for key, path in damaged.items():
        path.write_bytes(intact[key].read_bytes())

    reader = deployed.registry(deployed.reader_key)
    with pytest.raises(MaskIntegrityError) as info:
        reader.get_mask_by_uid(uid_a).compute()
    message = str(info.value)
    assert uid_a in message and "integrity" in message and "sha256" in message, message
    assert_no_secret(deployed, full_text(info.value))
    with pytest.raises(MaskIntegrityError):
        reader.resolve_composite(DET, [name_a, name_b])
    assert reader.describe(uid_a).name == name_a  # its record is intact
    np.testing.assert_array_equal(
        reader.get_mask(DET, name_b).compute(), servers.numbered_mask(201)
    )
    reader.close()


# ------------------------------------------------------------------ replay


def test_deployed_server_stores_and_replays_bluesky_runs(deployed):
    """The config's exporter: a run written with TiledWriter comes back as documents."""
    pytest.importorskip("bluesky_tiled_plugins")
    from bluesky_tiled_plugins import TiledWriter
    from event_model import compose_run
    from tiled.client import from_uri

    with httpx.Client(trust_env=False) as http:
        about = http.get(f"{deployed.uri}/").json()
    assert "application/json-seq" in about["formats"]["BlueskyRun"]

    client = from_uri(deployed.uri, api_key=deployed.writer_key)
    writer = TiledWriter(client)
    run = compose_run(metadata={"purpose": "replay through the deployed server"})
    frames = {
        "x": {"dtype": "number", "shape": [], "source": "sim"},
        "img": {"dtype": "array", "shape": [4, 5], "dtype_numpy": "<u4", "source": "sim"},
    }
    descriptor = run.compose_descriptor(name="primary", data_keys=frames)
    documents = [("start", run.start_doc), ("descriptor", descriptor.descriptor_doc)]
    for i in range(3):
        now = time.time()
        documents.append(
            (
                "event",
                descriptor.compose_event(
                    data={"x": float(i), "img": np.full((4, 5), i, dtype="uint32")},
                    timestamps={"x": now, "img": now},
                ),
            )
        )
    documents.append(("stop", run.compose_stop()))
    for name, doc in documents:
        writer(name, doc)
    client.context.close()

    reader = from_uri(deployed.uri, api_key=deployed.reader_key)
    replayed = list(reader[run.start_doc["uid"]].documents())
    reader.context.close()
    assert [name for name, _ in replayed] == [
        "start",
        "descriptor",
        "event",
        "event",
        "event",
        "stop",
    ]
    assert replayed[0][1]["uid"] == run.start_doc["uid"]


# -------------------------------------------------------- chx-masks serve


def test_serve_command_shares_a_registry_and_stops_cleanly(backend, request, tmp_path, monkeypatch):
    """`chx-masks serve --dir DIR [--catalog postgresql+asyncpg://...]`, key and all.

    SQLite: the key is generated and shown once; the served directory is an
    embedded registry. PostgreSQL: the key comes from $TILED_SINGLE_USER_API_KEY
    and is never shown.
    """
    directory = tmp_path / "registry"
    args, env, key = ["--dir", str(directory)], servers.clean_environment(), None
    if backend == "postgresql":
        catalog = request.getfixturevalue("postgres").create("plain_catalog")
        args += ["--catalog", catalog]
        key = secrets.token_hex(16)
        env["TILED_SINGLE_USER_API_KEY"] = key
    server = servers.ServeProcess(args, directory=tmp_path, env=env)
    try:
        out = server.stdout
        assert server.uri.startswith("http://127.0.0.1:") and server.uri.endswith("/api/v1")
        assert f"export CHX_MASKS_URI={server.uri}" in out
        if key is None:
            key = server.generated_key
            assert key and out.count(key) == 1
            assert f"sqlite:///{directory.resolve()}/catalog.db" in out
        else:
            assert server.generated_key is None and key not in out
            assert "postgresql+asyncpg://" in out

        # A client set up the way the announcement says.
        monkeypatch.setenv("CHX_MASKS_URI", server.uri)
        monkeypatch.setenv("CHX_MASKS_API_KEY", key)
        chx_masks.set_default_registry(None)
        uid = chx_masks.register_mask(DET, "shared", servers.numbered_mask(11))
        assert chx_masks.get_masks() == [(DET, "shared")]
        assert key not in repr(chx_masks.default_registry())
        chx_masks.set_default_registry(None)
        with httpx.Client(trust_env=False) as http:
            assert http.get(f"{server.uri}/metadata/").status_code == 401
            assert (
                http.get(
                    f"{server.uri}/metadata/", headers={"Authorization": f"Apikey {key}"}
                ).status_code
                == 200
            )
    finally:
        code = server.stop(signal.SIGINT if backend == "sqlite" else signal.SIGTERM)
    assert code == 0, server.log
    assert "server stopped" in server.log
    assert key not in server.log
    if backend == "sqlite":  # what was served is the embedded registry of DIR
        with MaskRegistry.embedded(directory) as embedded:
            assert embedded.get_mask_uid(DET, "shared") == uid
            np.testing.assert_array_equal(
                embedded.get_mask(DET, "shared").compute(), servers.numbered_mask(11)
            )


def _serve(*args: str):
    return CliRunner().invoke(main, ["serve", *args], catch_exceptions=False)


def test_serve_refuses_bad_options_with_one_line(tmp_path, monkeypatch):
    config = str(servers.DEPLOY_CONFIG)
    for name in (
        "CHX_MASKS_CATALOG_URI",
        "CHX_MASKS_AUTH_DB_URI",
        "CHX_MASKS_STORAGE",
        "CHX_MASKS_TABLES_URI",
        "CHX_MASKS_SECRET_KEY",
        "CHX_MASKS_ADMIN_PASSWORD",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TILED_SINGLE_USER_API_KEY", raising=False)

    usage = [
        ["--config", config, "--catalog", "postgresql+asyncpg://x@h/db"],
        ["--config", config, "--dir", str(tmp_path)],
    ]
    for args in usage:
        result = _serve(*args)
        assert result.exit_code == 2, (args, result.output)
    result = CliRunner().invoke(main, ["--uri", "http://127.0.0.1:1", "serve"])
    assert result.exit_code == 2 and "local registry" in result.output

    unset = _serve("--config", config)
    assert unset.exit_code == 1
    assert "$CHX_MASKS_CATALOG_URI" in unset.output and "$CHX_MASKS_SECRET_KEY" in unset.output

    bad_key = _serve("--dir", str(tmp_path / "r"), "--api-key", "not/a-key")
    assert bad_key.exit_code == 1 and "letters and digits" in bad_key.output

    password = "s3cretpassw0rd"
    bad_catalog = _serve(
        "--dir", str(tmp_path / "r"), "--catalog", f"mysql://chx:{password}@db/masks"
    )
    assert bad_catalog.exit_code == 1 and "postgresql+asyncpg://" in bad_catalog.output
    assert password not in bad_catalog.output

    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = _serve("--dir", str(tmp_path / "r"), "--port", str(port))
    assert busy.exit_code == 1 and f"127.0.0.1:{port}" in busy.output
    for result in (unset, bad_key, bad_catalog, busy):
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines[-1].startswith("chx-masks: ") and "Traceback" not in result.output
