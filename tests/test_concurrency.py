"""Concurrent writers in separate OS processes: slots claimed through tiled's 409.

Every writer is a real process (``spawn``) with its own registry: the embedded
one opened on one shared directory, or a client of the loopback tiled server.
Nothing is mocked.

Opening a registry in a new process is the slow part (importing tiled's server
alone takes seconds), so each backend gets one crew of worker processes for
this module: each opens its registry once, then runs the commands it is sent.
For each command the workers involved wait on a shared barrier first, so their
calls really overlap; they report through a queue. The registry (a fresh
embedded directory, or a fresh container on the server) is shared by the
tests of the module, which use distinct mask names.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import servers

import chx_masks
from chx_masks import BUILTIN_DETECTORS, MaskRegistry

CTX = multiprocessing.get_context("spawn")
EIGER500K = "eiger500K_single_image"
SHAPE_500K = BUILTIN_DETECTORS[EIGER500K].shape
CREW = 5  # 4 writers and a reader
WRITERS = 4
REGISTER_ROUNDS = 3
OPEN_TIMEOUT = 120.0  # seconds for the whole crew to start and open its registries
TIMEOUT = 120.0  # seconds for one command, barrier included

# Every test here needs the crew of processes (tens of seconds to start).
pytestmark = pytest.mark.slow


# ------------------------------------------------------------ child processes
# Module level, so that ``spawn`` pickles them by reference; plain arguments.


def numbered_mask(i: int) -> np.ndarray:
    """A mask every process can rebuild from ``i``: row ``i`` and column ``i`` masked."""
    mask = np.ones(SHAPE_500K, dtype=bool)
    mask[i, :] = False
    mask[:, i] = False
    return mask


def _open(kind: str, target: str, api_key: str | None) -> MaskRegistry:
    if kind == "embedded":
        return MaskRegistry.embedded(target)
    return MaskRegistry.from_uri(target, api_key=api_key)


def _failure(err: BaseException) -> tuple[str, str]:
    return type(err).__name__, f"{err}\n{traceback.format_exc()}"


def _op_register(registry, stop, name, i):
    return registry.register_mask(EIGER500K, name, numbered_mask(i))


def _op_update(registry, stop, name, i):
    return registry.update_mask(EIGER500K, name, numbered_mask(i))


def _op_poll(registry, stop, name, candidates):
    """get_mask(name) until ``stop``; which numbered mask each read equals (None: none)."""
    known = {i: numbered_mask(i) for i in candidates}

    def read_once():
        array = registry.get_mask(EIGER500K, name).compute()
        matches = [i for i, m in known.items() if np.array_equal(array, m)]
        return matches[0] if len(matches) == 1 else None

    reads, errors, seen = 0, [], []
    while not stop.is_set():
        try:
            match = read_once()
        except Exception as err:  # reported, judged by the test
            errors.append(_failure(err))
            if len(errors) >= 5:
                break
            continue
        reads += 1
        if not seen or seen[-1] != match:
            seen.append(match)
        time.sleep(0.005)
    return {"reads": reads, "errors": errors, "seen": seen, "final": read_once()}


def _op_adopt(registry, stop):
    return [record.uid for record in registry.adopt_legacy()]


_OPS = {"register": _op_register, "update": _op_update, "poll": _op_poll, "adopt": _op_adopt}


def _crew_worker(kind, target, api_key, index, barriers, commands, results, stop):
    """Open the registry, report ready, then run commands until ``None``.

    A command is ``(op, parties, *args)``: wait on the barrier of ``parties``
    processes, run ``op``, report ``(index, op, "ok", value)`` or
    ``(index, op, error class name, message)``.
    """
    registry = None
    try:
        registry = _open(kind, target, api_key)
        results.put((index, "open", "ok", os.getpid()))
        while (command := commands.get()) is not None:
            op, parties, *args = command
            try:
                barriers[parties].wait(timeout=TIMEOUT)
                value = _OPS[op](registry, stop, *args)
            except Exception as err:
                results.put((index, op, *_failure(err)))
            else:
                results.put((index, op, "ok", value))
    except BaseException as err:
        results.put((index, "crashed", *_failure(err)))
    finally:
        servers.close_worker(registry, results)
    # Everything is reported and closed; skip the interpreter's slow teardown.
    os._exit(0)


# ----------------------------------------------------------------- the crew


@dataclass
class Crew:
    kind: str
    processes: list
    commands: list
    results: Any
    stop: Any
    registry: MaskRegistry  # the test's own registry on the same storage

    def send(self, index: int, op: str, parties: int, *args: Any) -> None:
        self.commands[index].put((op, parties, *args))

    def collect(self, count: int, timeout: float = TIMEOUT) -> list[tuple]:
        reports = []
        deadline = time.monotonic() + timeout
        while len(reports) < count:
            try:
                report = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_module.Empty:
                dead = [p.pid for p in self.processes if not p.is_alive()]
                pytest.fail(
                    f"{len(reports)} of {count} reports in {timeout} s; dead workers "
                    f"{dead}; got {reports}"
                )
            assert report[1] != "crashed", f"worker crashed: {report}"
            reports.append(report)
        return reports

    def mask_uids(self) -> set[str]:
        root = self.registry._root
        return set(root["masks"]) if "masks" in root else set()

    def fresh(self) -> MaskRegistry:
        """A registry on the same storage with empty caches: reads come from tiled."""
        return MaskRegistry(self.registry._root, location=self.registry.location)


@pytest.fixture(scope="module", params=["embedded", "server"])
def crew(request, tmp_path_factory):
    if request.param == "embedded":
        target, api_key = str(tmp_path_factory.mktemp("shared") / "registry"), None
    else:
        from tiled.client import from_uri

        server = request.getfixturevalue("tiled_server")
        key = f"concurrency-{uuid.uuid4().hex[:12]}"
        root = from_uri(server.uri)
        root.create_container(key=key)
        root.context.close()
        target = f"http://127.0.0.1:{server.port}/api/v1/metadata/{key}"
        api_key = server.api_key

    barriers = {n: CTX.Barrier(n) for n in (2, CREW)}
    commands = [CTX.Queue() for _ in range(CREW)]
    results = CTX.Queue()
    stop = CTX.Event()
    processes = [
        CTX.Process(
            target=_crew_worker,
            args=(request.param, target, api_key, i, barriers, commands[i], results, stop),
            daemon=True,
        )
        for i in range(CREW)
    ]
    for p in processes:
        p.start()
    registry = None
    try:
        crew = Crew(request.param, processes, commands, results, stop, None)
        opened = crew.collect(CREW, timeout=OPEN_TIMEOUT)
        assert all(r[1:3] == ("open", "ok") for r in opened), opened
        crew.registry = registry = _open(request.param, target, api_key)
        yield crew
    finally:
        for q in commands:
            q.put(None)
        for p in processes:
            p.join(timeout=30)
        for p in processes:
            if p.is_alive():
                p.kill()
                p.join()
        if registry is not None:
            registry.close()
    assert [p.exitcode for p in processes] == [0] * CREW


# ---------------------------------------------------------------------- tests


def test_two_processes_register_one_name_at_once(crew):
    before = crew.mask_uids()
    winners = {}
    for r in range(REGISTER_ROUNDS):
        name = f"race-{r}"
        for i in (0, 1):
            crew.send(i, "register", 2, name, i)
        reports = sorted(crew.collect(2))
        outcomes = sorted(report[2] for report in reports)
        assert outcomes == ["MaskExistsError", "ok"], reports
        [(index, _, _, uid)] = [report for report in reports if report[2] == "ok"]
        winners[name] = (index, uid)

    registry = crew.fresh()
    assert sorted(registry.get_masks()) == sorted((EIGER500K, name) for name in winners)
    for name, (index, uid) in winners.items():
        history = registry.history(EIGER500K, name)
        assert [(h.version, h.uid) for h in history] == [(0, uid)]
        assert registry.get_mask_uid(EIGER500K, name) == uid
        np.testing.assert_array_equal(
            registry.get_mask(EIGER500K, name).compute(), numbered_mask(index)
        )
    # The losers' arrays (written before their claims were refused) are gone.
    assert crew.mask_uids() - before == {uid for _, uid in winners.values()}
    assert before <= crew.mask_uids()


def test_concurrent_updates_get_consecutive_versions_and_reader_sees_whole_masks(crew):
    name = "beamstop"
    before = crew.mask_uids()
    uid0 = crew.registry.register_mask(EIGER500K, name, numbered_mask(0))

    writers = range(WRITERS)  # worker w writes numbered_mask(w + 1)
    reader = WRITERS
    crew.send(reader, "poll", CREW, name, list(range(WRITERS + 1)))
    for w in writers:
        crew.send(w, "update", CREW, name, w + 1)
    reports = []
    try:
        while sum(report[0] != reader for report in reports) < WRITERS:
            reports += crew.collect(1)
    finally:
        crew.stop.set()  # the writers are done (or failed): stop polling
    try:
        if all(report[0] != reader for report in reports):
            reports += crew.collect(1)
    finally:
        crew.stop.clear()
    [reader_report] = [report for report in reports if report[0] == reader]
    reports = [report for report in reports if report[0] != reader]

    assert all(report[1:3] == ("update", "ok") for report in reports), reports
    mask_of_uid = {uid0: 0, **{report[3]: report[0] + 1 for report in reports}}
    assert len(mask_of_uid) == WRITERS + 1  # distinct uids

    registry = crew.fresh()
    history = registry.history(EIGER500K, name)
    assert [h.version for h in history] == list(range(WRITERS + 1))
    assert history[0].uid == uid0
    assert {h.uid for h in history} == set(mask_of_uid)
    assert [h.active for h in history] == [False] * WRITERS + [True]
    for earlier, later in zip(history, history[1:], strict=False):
        assert earlier.superseded_at == later.registered_at
        assert earlier.registered_at < later.registered_at
    # Every uid reads back bit for bit what its own writer wrote.
    for uid, i in mask_of_uid.items():
        np.testing.assert_array_equal(registry.get_mask_by_uid(uid).compute(), numbered_mask(i))
        assert registry.describe(uid).uid == uid
    np.testing.assert_array_equal(
        registry.get_mask(EIGER500K, name).compute(), numbered_mask(mask_of_uid[history[-1].uid])
    )
    assert crew.mask_uids() - before == set(mask_of_uid)

    # The reader, polling all along, saw no error and only whole, written masks,
    # in version order, ending at the last version.
    assert reader_report[0] == reader and reader_report[1:3] == ("poll", "ok"), reader_report
    polled = reader_report[3]
    assert polled["errors"] == [], polled["errors"]
    assert polled["reads"] > 0
    version_of_uid = {h.uid: h.version for h in history}
    version_of_mask = {i: version_of_uid[uid] for uid, i in mask_of_uid.items()}
    assert all(match in version_of_mask for match in polled["seen"]), polled["seen"]
    versions_seen = [version_of_mask[match] for match in polled["seen"]]
    assert versions_seen == sorted(versions_seen), polled["seen"]
    assert version_of_mask[polled["final"]] == WRITERS


def test_two_processes_adopt_legacy_masks_at_once(crew):
    legacy = {}
    for name in ("legacy-a", "legacy-b"):
        for version in range(3):
            uid = str(uuid.uuid4())
            index = 10 + len(legacy)
            crew.registry._root.write_array(
                numbered_mask(index),
                key=uid,
                metadata={"spec": "mask", "name": name, "detector": EIGER500K, "version": version},
            )
            legacy[uid] = (name, version, index)
    for i in (0, 1):
        crew.send(i, "adopt", 2)
    reports = sorted(crew.collect(2))

    # Whoever did what, every legacy mask ends up adopted exactly once.
    registry = crew.fresh()
    for name in ("legacy-a", "legacy-b"):
        history = registry.history(EIGER500K, name)
        assert [(h.version, legacy[h.uid][:2]) for h in history] == [
            (v, (name, v)) for v in range(3)
        ]
    assert set(legacy) <= crew.mask_uids()
    for uid, (_, _, index) in legacy.items():
        np.testing.assert_array_equal(registry.get_mask_by_uid(uid).compute(), numbered_mask(index))
        assert registry.describe(uid).legacy is False
    assert registry.adopt_legacy() == []

    # Each call returned, or refused with a ChxMasksError (README: every refused
    # call raises a subclass of chx_masks.ChxMasksError); what they adopted is
    # disjoint.
    for report in reports:
        if report[2] != "ok":
            error = getattr(chx_masks, report[2], None)
            assert isinstance(error, type) and issubclass(error, chx_masks.ChxMasksError), report
    adopted = [uid for report in reports if report[2] == "ok" for uid in report[3]]
    assert len(adopted) == len(set(adopted))
