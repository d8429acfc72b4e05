"""A local server for an embedded registry, shared by ``chx-masks`` commands.

Serving a directory in-process means importing tiled's server first, about
3 s of every command on a 2-core machine (``tiled.adapters.protocols``
imports dask.dataframe, pandas and sparse whatever is served). So the first
command on an embedded registry starts a tiled server for its directory on
127.0.0.1, in a process of its own, with a random API key; the port, key and
process id go to ``DIR/.local-server.json`` (readable by its owner only).
Later commands connect to it as to a server registry, which costs about a
third. The server serves the directory exactly as the embedded registry
does (no append-only policy; writes are recorded as the operating-system
user) and other processes may still open the directory directly.

It stops by itself after ``$CHX_MASKS_LOCAL_IDLE`` seconds (default 600)
without a request, when its directory or catalog disappears, or when its
state file names another server. ``CHX_MASKS_LOCAL_SERVER=0`` turns it off:
each command then serves the directory in-process, as the Python API does.
Its log is ``DIR/.local-server.log``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard
from urllib.parse import urlsplit

from ._embedded import _locked

if TYPE_CHECKING:
    from ._registry import MaskRegistry

logger = logging.getLogger(__name__)

STATE = ".local-server.json"
LOCK = ".local-server.lock"
LOG = ".local-server.log"
# A fresh server imports tiled and opens the catalog: seconds, more when busy.
START_TIMEOUT = 120.0
CONNECT_TIMEOUT = 10.0
# Servers this process started: they outlive it on purpose, and a Popen
# dropped while its process runs warns (ResourceWarning).
_started: list[subprocess.Popen] = []


def enabled() -> bool:
    """Whether commands share a local server (``$CHX_MASKS_LOCAL_SERVER``, default on).

    Examples
    --------
    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"CHX_MASKS_LOCAL_SERVER": "off"}):
    ...     enabled()
    False
    >>> with mock.patch.dict(os.environ, {"CHX_MASKS_LOCAL_SERVER": "1"}):
    ...     enabled()
    True
    """
    from .settings import settings

    return settings().local_server


def idle_seconds() -> float:
    """``$CHX_MASKS_LOCAL_IDLE``: seconds without a request before the server stops."""
    from .settings import settings

    return settings().local_idle


def _signature() -> dict[str, str]:
    """What a server must share with a client to serve it: the same software."""
    from importlib.metadata import version

    # The environment, not the interpreter's name: `chx-masks` may run as
    # .../bin/python3 and `python -m chx_masks` as .../bin/python.
    return {"chx_masks": version("chx-masks"), "tiled": version("tiled"), "environment": sys.prefix}


def _read_state(directory: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((directory / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _alive(pid: Any) -> TypeGuard[int]:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def connect(directory: Path) -> MaskRegistry | None:
    """A registry on the local server of ``directory``, started if none runs.

    Returns None when no server can serve it (the directory cannot be
    written, the server did not start): the caller then opens the directory
    in-process, which reports any real problem in its own words.

    Examples
    --------
    >>> import os, tempfile
    >>> from pathlib import Path
    >>> from unittest import mock
    >>> directory = Path(tempfile.mkdtemp())
    >>> with mock.patch.dict(os.environ, {"CHX_MASKS_LOCAL_IDLE": "30"}):
    ...     reg = connect(directory)
    >>> reg.location == str(directory), (directory / STATE).exists()
    (True, True)
    >>> reg.close(); stop(directory)
    True
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = directory / LOCK
        lock.touch()
    except OSError:
        return None
    with _locked(lock):
        registry = _attach(directory)
        if registry is None and _start(directory):
            registry = _attach(directory)
    return registry


def stop(directory: Path, timeout: float = 30.0) -> bool:
    """Stop the local server of ``directory``; True if one was running.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> stop(Path(tempfile.mkdtemp()))
    False
    """
    state = _read_state(directory)
    pid = state.get("pid") if state else None
    if not _alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.05)
    return True


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child that has ended (no zombie stays 'alive')."""
    for child in _started:
        if child.pid == pid:
            child.poll()
            return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _attach(directory: Path) -> MaskRegistry | None:
    from ._errors import ChxMasksError
    from ._registry import MaskRegistry, _local_user

    state = _read_state(directory)
    if state is None:
        return None
    if not _alive(state.get("pid")) or any(state.get(k) != v for k, v in _signature().items()):
        return None
    try:
        registry = MaskRegistry.from_uri(
            f"http://127.0.0.1:{int(state['port'])}/api/v1",
            api_key=str(state["key"]),
            timeout=CONNECT_TIMEOUT,
        )
        registry.last_change()  # the server answers, and its idle clock restarts
    except (ChxMasksError, KeyError, TypeError, ValueError):
        logger.debug("the local server of %s did not answer", directory, exc_info=True)
        return None
    registry.location = str(directory)
    # As embedded: this user's own server, which enforces nothing.
    registry._identity = _local_user()
    registry._embedded = True
    return registry


def _start(directory: Path) -> bool:
    """Start a server for ``directory`` and wait until it answers (or ends)."""
    try:
        log = open(directory / LOG, "wb")  # noqa: SIM115 (the child keeps it)
    except OSError:
        return False
    with log:
        child = subprocess.Popen(
            [sys.executable, "-m", "chx_masks._local", str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    _started.append(child)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        state = _read_state(directory)
        if state is not None and state.get("pid") == child.pid:
            return True
        if child.poll() is not None:
            logger.warning(
                "The local server of %s did not start (see %s); serving it in this process.",
                directory,
                directory / LOG,
            )
            return False
        time.sleep(0.05)
    child.terminate()
    return False


class _IdleClock:
    """An ASGI wrapper that notes when the app last got a request."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.last = time.monotonic()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.last = time.monotonic()
        await self.app(scope, receive, send)


def _write_state(directory: Path, state: dict[str, Any]) -> None:
    partial = directory / f".{STATE}.{os.getpid()}"
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)
    os.replace(partial, directory / STATE)


def _ours(directory: Path) -> bool:
    state = _read_state(directory)
    return state is not None and state.get("pid") == os.getpid()


def _watch(directory: Path, clock: _IdleClock, idle: float) -> None:
    """Stop this server when idle, or when its directory or state file is gone."""
    period = min(5.0, idle / 4)
    while True:
        time.sleep(period)
        gone = not (directory / "catalog.db").exists() or not _ours(directory)
        if not gone and time.monotonic() - clock.last < idle:
            continue
        if not gone and not _retire(directory, clock, idle):
            continue
        os.kill(os.getpid(), signal.SIGTERM)
        return


def _retire(directory: Path, clock: _IdleClock, idle: float) -> bool:
    """Withdraw this idle server's state file; False if a client came meanwhile."""
    try:
        # A client attaching holds the lock and makes a request first.
        with _locked(directory / LOCK):
            if time.monotonic() - clock.last < idle:
                return False
            if _ours(directory):
                (directory / STATE).unlink(missing_ok=True)
    except OSError:
        pass  # the directory went away meanwhile: nothing to withdraw
    return True


def serve(directory: Path) -> None:
    """Serve ``directory`` on 127.0.0.1 until idle (the server process's main)."""
    from ._embedded import embedded_app
    from ._serve import Plan, run

    key = secrets.token_hex(32)
    clock = _IdleClock(embedded_app(directory, api_key=key))
    plan = Plan(
        app=clock,
        host="127.0.0.1",
        port=0,
        catalogs=(str(directory / "catalog.db"),),
        storage=(str(directory / "data"),),
        key_source="given",
        public=False,
    )

    def ready(info: Any) -> None:
        port = urlsplit(info.uri).port
        _write_state(directory, {"pid": os.getpid(), "port": port, "key": key, **_signature()})
        threading.Thread(
            target=_watch,
            args=(directory, clock, idle_seconds()),
            name="chx-masks-local-idle",
            daemon=True,
        ).start()

    try:
        run(plan, on_ready=ready)
    finally:
        if _ours(directory):
            (directory / STATE).unlink(missing_ok=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
