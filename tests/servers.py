"""Real servers for tests/test_server.py: processes, databases, keys, a crew of clients.

- :class:`Postgres` makes fresh databases (``chx_masks_<session>_<label>_<n>``) on
  the PostgreSQL at ``$CHX_MASKS_TEST_POSTGRES`` and drops them at the end.
- :class:`ServeProcess` runs ``chx-masks serve`` in its own process on
  loopback, as a person would, and reads the URI from what it prints.
- :func:`create_service_key` makes an API key with scopes the way an admin
  does (log in, create a service account, give it a key).
- :class:`Crew` is a set of ``spawn`` worker processes, each a separate client
  of one server, that start each command together at a barrier.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue as queue_module
import signal
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

POSTGRES_ENV = "CHX_MASKS_TEST_POSTGRES"
DEFAULT_POSTGRES = "postgresql://root@127.0.0.1:5432/postgres"
DEPLOY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "tiled-config.yml"
READ_SCOPES = ["read:metadata", "read:data"]
WRITE_SCOPES = [
    *READ_SCOPES,
    "create:node",
    "write:metadata",
    "write:data",
    "delete:node",
    "delete:revision",
]  # deleting the array of a refused write needs both
DETECTOR = "eiger500K_single_image"
SHAPE = (514, 1030)
START_TIMEOUT = 120.0  # seconds for a server to print its URI
COMMAND_TIMEOUT = 180.0  # seconds for one crew command, barrier included
# Variables that would point a client or server somewhere else.
_LEAKY_ENV = (
    "CHX_MASKS_URI",
    "CHX_MASKS_API_KEY",
    "CHX_MASKS_PROFILE",
    "TILED_API_KEY",
    "TILED_SINGLE_USER_API_KEY",
    "TILED_CONFIG",
)


class Unavailable(Exception):
    """A service the tests need is not there; the message says why."""


# --------------------------------------------------------------- PostgreSQL


class Postgres:
    """Fresh databases on one PostgreSQL server, all dropped by :meth:`close`."""

    def __init__(self, admin_uri: str) -> None:
        self.admin_uri = admin_uri
        self.session = uuid.uuid4().hex[:10]
        self.created: list[str] = []
        self._count = 0

    @classmethod
    def connect(cls) -> Postgres:
        """Reach the server at ``$CHX_MASKS_TEST_POSTGRES`` (or loopback as root)."""
        admin_uri = os.environ.get(POSTGRES_ENV, DEFAULT_POSTGRES)
        try:
            import asyncpg  # noqa: F401 (tiled[server] brings it)
        except ImportError as err:
            raise Unavailable(f"asyncpg is not installed ({err})") from err
        pg = cls(admin_uri)
        try:
            pg._execute("SELECT 1")
        except Exception as err:
            raise Unavailable(
                f"PostgreSQL is not reachable at {admin_uri} ({type(err).__name__}: {err}); "
                f"start it or set {POSTGRES_ENV}=postgresql://USER@HOST:PORT/postgres"
            ) from err
        return pg

    def _execute(self, *statements: str) -> None:
        import asyncpg

        async def go() -> None:
            connection = await asyncpg.connect(self.admin_uri, timeout=5)
            try:
                for statement in statements:
                    await connection.execute(statement)
            finally:
                await connection.close()

        asyncio.run(go())

    def create(self, label: str, *, driver: str = "postgresql+asyncpg") -> str:
        """A new, empty database; its URI with ``driver`` as the scheme.

        Each call gets its own database, even for a label used before.
        """
        self._count += 1
        name = f"chx_masks_{self.session}_{label}_{self._count}"
        self._execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return self.uri(name, driver=driver)

    def uri(self, name: str, *, driver: str = "postgresql+asyncpg") -> str:
        parts = urlsplit(self.admin_uri)
        return urlunsplit((driver, parts.netloc, f"/{name}", "", ""))

    def close(self) -> None:
        while self.created:
            name = self.created.pop()
            # FORCE ends connections a killed server may have left behind.
            self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ------------------------------------------------------------------ servers


def clean_environment(**extra: str) -> dict[str, str]:
    """os.environ without anything that points at another registry or key."""
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY_ENV}
    env.update(extra)
    return env


class ServeProcess:
    """``chx-masks serve ARGS --port PORT`` in its own process, until :meth:`stop`.

    stdout (the announcement) and stderr (the server's log) go to files in
    ``directory`` so a test can read everything the server ever wrote (a
    server started again on the same directory appends to them). Port 0
    lets the system choose a free port.
    """

    def __init__(
        self, args: list[str], *, directory: Path, env: dict[str, str], port: int = 0
    ) -> None:
        self.directory = directory
        self.stdout_path = directory / "serve.stdout"
        self.stderr_path = directory / "serve.stderr"
        command = [
            sys.executable,
            "-m",
            "chx_masks",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ]
        self.stdout_path.write_text("")  # the announcement of this start only
        with open(self.stdout_path, "a") as out, open(self.stderr_path, "a") as err:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env
            )
        self.returncode: int | None = None
        deadline = time.monotonic() + START_TIMEOUT
        while "Stop with Ctrl-C." not in self.stdout:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"chx-masks serve did not start (exit {self.process.returncode}):\n"
                    f"{self.stdout}\n{self.log}"
                )
            time.sleep(0.1)
        self.uri = self._value("export CHX_MASKS_URI=")
        shown = self._value("export CHX_MASKS_API_KEY=")
        self.generated_key = None if shown.startswith("...") else shown.split()[0]

    def _value(self, prefix: str) -> str:
        for line in self.stdout.splitlines():
            if line.strip().startswith(prefix):
                return line.strip()[len(prefix) :]
        raise AssertionError(f"no {prefix!r} line in:\n{self.stdout}")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def log(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        """Ask the server to stop (as Ctrl-C or a service manager does); its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.returncode = self.process.returncode
        return self.returncode


def create_service_key(
    uri: str, username: str, password: str, scopes: list[str], note: str, *, role: str = "user"
) -> str:
    """An API key with ``scopes`` for a new service account with ``role``, made by an admin.

    The HTTP equivalent of ``tiled login`` + ``tiled admin
    create-service-principal --role ROLE`` + ``tiled admin api-key create UUID
    --scopes ...`` (deploy/README.md).
    """
    import httpx

    with httpx.Client(base_url=uri, trust_env=False, timeout=30) as http:
        tokens = http.post(
            "/auth/provider/toy/token", data={"username": username, "password": password}
        )
        tokens.raise_for_status()
        bearer = {"Authorization": f"Bearer {tokens.json()['access_token']}"}
        principal = http.post("/auth/principal", params={"role": role}, headers=bearer)
        principal.raise_for_status()
        key = http.post(
            f"/auth/principal/{principal.json()['uuid']}/apikey",
            headers=bearer,
            json={"scopes": scopes, "expires_in": None, "note": note},
        )
        key.raise_for_status()
        return key.json()["secret"]


# ------------------------------------------------------------------ masks


def numbered_mask(i: int) -> np.ndarray:
    """A mask every process can rebuild from ``i``: scattered pixels, row i, column i."""
    mask = np.random.default_rng(1000 + i).random(SHAPE) >= 0.02
    mask[i, :] = False
    mask[:, i] = False
    return mask


# -------------------------------------------------------------------- crew
# Module-level functions so that ``spawn`` pickles them by reference.


def _failure(err: BaseException) -> tuple[str, str]:
    return type(err).__name__, f"{err}\n{traceback.format_exc()}"


def _op_register(registry, client, stop, name, i):
    return registry.register_mask(DETECTOR, name, numbered_mask(i))


def _op_update(registry, client, stop, name, i):
    return registry.update_mask(DETECTOR, name, numbered_mask(i))


def _op_poll(registry, client, stop, names, candidates):
    """Read ``names`` through the server until ``stop``; every read checked whole.

    Each round uses a registry with empty caches (memory and disk), so every
    read of an array is a request to the server. A read counts if the array
    is bool, of the detector's shape, hashes to the sha256 the registry
    recorded for its uid and equals one of the masks the writers write.
    """
    from chx_masks import MaskNotFoundError, MaskRegistry, mask_sha256

    known = {i: numbered_mask(i) for i in candidates}
    reads, rounds, not_yet, problems, seen, order = 0, 0, 0, [], {}, []
    while not stop.is_set():
        rounds += 1
        fresh = MaskRegistry(client, location=registry.location, disk_cache=False)
        for name in names:
            try:
                uid = fresh.get_mask_uid(DETECTOR, name)
            except MaskNotFoundError:
                not_yet += 1  # not registered yet: nothing to read
                continue
            try:
                array = fresh.get_mask_by_uid(uid).compute()
                recorded = fresh.describe(uid).sha256
            except Exception as err:  # judged by the test
                problems.append(_failure(err))
                continue
            matches = [i for i, mask in known.items() if np.array_equal(array, mask)]
            if (
                array.dtype != np.bool_
                or array.shape != SHAPE
                or mask_sha256(array) != recorded
                or len(matches) != 1
            ):
                problems.append(
                    (
                        "PartialMask",
                        f"uid {uid} read back {array.dtype} {array.shape}, matching {matches}",
                    )
                )
                continue
            reads += 1
            if uid not in seen:
                order.append(uid)
            seen[uid] = matches[0]
        if len(problems) >= 20:
            break
        stop.wait(0.02)  # a client polling, not a load test: leave the writers room
    return {
        "reads": reads,
        "rounds": rounds,
        "not_yet": not_yet,
        "problems": problems,
        "seen": seen,
        "order": order,
    }


_OPS = {"register": _op_register, "update": _op_update, "poll": _op_poll}


def crew_worker(uri, api_key, cache_dir, index, barrier, commands, results, stop):
    """Open a registry on the server, report ready, then run commands until ``None``.

    A command is ``(op, *args)``; every worker gets one per round and waits on
    the barrier, so all start at once. Reports are ``(index, op, outcome,
    value, started, seconds)``: outcome ``"ok"`` or the error's class name;
    started is the wall-clock time the barrier released this worker.
    """
    os.environ["CHX_MASKS_CACHE_DIR"] = cache_dir  # never the user's cache
    registry = None
    try:
        from tiled.client import from_uri

        from chx_masks import MaskRegistry

        registry = MaskRegistry.from_uri(uri, api_key=api_key, timeout=60)
        client = from_uri(uri, api_key=api_key)
        results.put((index, "open", "ok", os.getpid(), time.time(), None))
        while (command := commands.get()) is not None:
            op, *args = command
            started = None
            try:
                barrier.wait(timeout=COMMAND_TIMEOUT)
                started = time.time()
                value = _OPS[op](registry, client, stop, *args)
            except Exception as err:
                results.put((index, op, *_failure(err), started, _since(started)))
            else:
                results.put((index, op, "ok", value, started, _since(started)))
        client.context.close()
    except BaseException as err:
        results.put((index, "crashed", *_failure(err), None, None))
    finally:
        close_worker(registry, results)
    os._exit(0)  # everything is reported and closed; skip the slow teardown


def close_worker(registry: Any, results: Any) -> None:
    """A worker process's last act: close its registry, deliver every report, flush."""
    if registry is not None:
        registry.close()
    results.close()
    results.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()


def _since(started: float | None) -> float | None:
    return None if started is None else time.time() - started


@dataclass
class Report:
    index: int
    op: str
    outcome: str
    value: Any
    started: float | None  # wall clock when the barrier released the worker
    seconds: float | None  # how long its command took from then


@dataclass
class Crew:
    """``size`` client processes of one server; :meth:`round` runs one command each."""

    size: int
    processes: list = field(default_factory=list)
    commands: list = field(default_factory=list)
    results: Any = None
    stop: Any = None
    barrier: Any = None

    @classmethod
    def start(cls, uri: str, api_keys: list[str], cache_dir: Path) -> Crew:
        """One worker per key in ``api_keys``, all clients of the server at ``uri``."""
        size = len(api_keys)
        ctx = multiprocessing.get_context("spawn")
        crew = cls(size, results=ctx.Queue(), stop=ctx.Event(), barrier=ctx.Barrier(size))
        crew.commands = [ctx.Queue() for _ in range(size)]
        crew.processes = [
            ctx.Process(
                target=crew_worker,
                daemon=True,
                args=(
                    uri,
                    api_keys[i],
                    str(cache_dir),
                    i,
                    crew.barrier,
                    crew.commands[i],
                    crew.results,
                    crew.stop,
                ),
            )
            for i in range(size)
        ]
        for process in crew.processes:
            process.start()
        try:
            opened = crew.collect(size, timeout=START_TIMEOUT)
        except BaseException:
            crew.close()
            raise
        bad = [r for r in opened if (r.op, r.outcome) != ("open", "ok")]
        if bad:
            crew.close()
            raise RuntimeError(f"crew workers failed to open the registry: {bad}")
        return crew

    def collect(self, count: int, timeout: float = COMMAND_TIMEOUT) -> list[Report]:
        reports: list[Report] = []
        deadline = time.monotonic() + timeout
        while len(reports) < count:
            try:
                raw = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_module.Empty:
                dead = [p.pid for p in self.processes if not p.is_alive()]
                raise TimeoutError(
                    f"{len(reports)} of {count} reports in {timeout} s; "
                    f"dead workers {dead}; got {reports}"
                ) from None
            report = Report(*raw)
            if report.op == "crashed":
                raise RuntimeError(f"crew worker {report.index} crashed: {report.value}")
            reports.append(report)
        return sorted(reports, key=lambda r: r.index)

    def round(self, commands: dict[int, tuple], *, until_done: set[int]) -> list[Report]:
        """Send each worker its command; when the ``until_done`` ones have reported,
        set ``stop`` (pollers return) and collect the rest."""
        assert set(commands) == set(range(self.size)), "every worker takes part"
        self.stop.clear()
        for index, command in commands.items():
            self.commands[index].put(command)
        reports: list[Report] = []
        try:
            while not until_done <= {r.index for r in reports}:
                reports += self.collect(1)
        finally:
            self.stop.set()
        reports += self.collect(self.size - len(reports))
        self.stop.clear()
        return sorted(reports, key=lambda r: r.index)

    def close(self) -> list[int | None]:
        for commands in self.commands:
            commands.put(None)
        for process in self.processes:
            process.join(timeout=30)
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join()
        return [p.exitcode for p in self.processes]
