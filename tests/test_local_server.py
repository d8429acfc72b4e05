"""The local server that ``chx-masks`` commands share for an embedded registry.

Real processes throughout: the command line as a user runs it, the server it
starts, and the in-process embedded registry reading the same directory.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fresh import command_modules

from chx_masks import MaskRegistry
from chx_masks._local import STATE, stop
from chx_masks._registry import _local_user

DETECTOR = "eiger500K_single_image"


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CHX_MASKS_URI", "CHX_MASKS_PROFILE", "CHX_MASKS_API_KEY")
    }
    env.update({"CHX_MASKS_LOCAL_SERVER": "1", "CHX_MASKS_LOCAL_IDLE": "120"})
    env.update(extra)
    return env


def _cli(directory: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "chx_masks", "--dir", str(directory), *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done


def _state(directory: Path) -> dict:
    return json.loads((directory / STATE).read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A server started by a command is not our child; a zombie would be.
    return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def _servers(directory: Path) -> list[int]:
    """Processes serving ``directory`` as its local server."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"chx_masks._local" in argv and str(directory).encode() in argv:
            if _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.fixture
def directory(tmp_path):
    path = tmp_path / "registry"
    yield path
    stop(path)
    for pid in _servers(path):
        os.kill(pid, 9)


def test_commands_share_one_server_that_records_the_user(directory, tmp_path):
    mask = np.ones((514, 1030), dtype=bool)
    mask[:2] = False
    np.save(tmp_path / "gap.npy", mask)
    registered = _cli(directory, "register", DETECTOR, "gap", str(tmp_path / "gap.npy"))
    state = _state(directory)
    assert stat.S_IMODE((directory / STATE).stat().st_mode) == 0o600
    assert _servers(directory) == [state["pid"]]
    listed = _cli(directory, "list", "--json")
    history = json.loads(_cli(directory, "history", DETECTOR, "gap", "--json").stdout)
    # The same server answered every command; its key was never shown.
    assert _state(directory)["pid"] == state["pid"]
    assert _servers(directory) == [state["pid"]]
    for out in (registered, listed):
        assert state["key"] not in out.stdout + out.stderr
    assert history[0]["created_by"] == _local_user()
    # The directory is an ordinary embedded registry: opened in-process, the same bytes.
    with MaskRegistry.embedded(directory, disk_cache=False) as reg:
        record = reg.describe(history[0]["uid"])
        assert record.created_by == _local_user()
        assert np.array_equal(reg.get_mask(DETECTOR, "gap").compute(), mask)
    assert json.loads(listed.stdout)[0]["uid"] == history[0]["uid"]


def test_an_idle_server_stops_and_the_next_command_starts_another(directory):
    _cli(directory, "list", CHX_MASKS_LOCAL_IDLE="2")
    first = _state(directory)["pid"]
    assert _wait_until(lambda: not _alive(first), 30), "the idle server did not stop"
    assert not (directory / STATE).exists()
    assert "No masks registered." in _cli(directory, "list").stdout
    assert _servers(directory) == [_state(directory)["pid"]] != [first]


def test_stale_and_foreign_state_files_are_replaced(directory):
    directory.mkdir()
    # A server that died without cleaning up.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    (directory / STATE).write_text(json.dumps({"pid": int(dead), "port": 9, "key": "0" * 64}))
    _cli(directory, "list")
    first = _state(directory)["pid"]
    assert _servers(directory) == [first]
    # A server of another chx-masks/tiled install is not used; it stops once
    # the state file names another server.
    state = _state(directory)
    (directory / STATE).write_text(json.dumps({**state, "tiled": "0.0.0"}))
    _cli(directory, "list")
    second = _state(directory)["pid"]
    assert second != first
    assert _wait_until(lambda: not _alive(first), 30), "the replaced server did not stop"
    assert _servers(directory) == [second]


def test_commands_started_together_start_one_server(directory):
    commands = [
        subprocess.Popen(
            [sys.executable, "-m", "chx_masks", "--dir", str(directory), "list"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for _ in range(3)
    ]
    outcomes = [c.communicate(timeout=300) for c in commands]
    assert [c.returncode for c in commands] == [0, 0, 0], outcomes
    assert all("No masks registered." in out for out, _ in outcomes)
    assert _servers(directory) == [_state(directory)["pid"]]


def test_switched_off_the_command_serves_the_directory_itself(directory):
    assert "No masks registered." in _cli(directory, "list", CHX_MASKS_LOCAL_SERVER="0").stdout
    assert (directory / "catalog.db").exists()
    assert not (directory / STATE).exists()
    assert _servers(directory) == []


def test_a_server_whose_directory_is_removed_stops(directory):
    import shutil

    _cli(directory, "list", CHX_MASKS_LOCAL_IDLE="8")  # checks every 2 s
    pid = _state(directory)["pid"]
    shutil.rmtree(directory)
    assert _wait_until(lambda: not _alive(pid), 30), "the server outlived its directory"


def test_a_command_on_a_running_server_imports_no_tiled_server_nor_dask(directory):
    _cli(directory, "list")  # starts the server
    output, modules = command_modules(
        ["--dir", str(directory), "list"], CHX_MASKS_LOCAL_SERVER="1", CHX_MASKS_LOCAL_IDLE="120"
    )
    assert output == "No masks registered."
    heavy = {
        m
        for m in modules
        if m.split(".")[0] in ("dask", "pandas", "sparse", "fastapi", "sqlalchemy")
        or m.startswith(("tiled.server", "tiled.catalog", "tiled.adapters"))
    }
    assert heavy == set()
