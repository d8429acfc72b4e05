"""``chx-masks demo``: the quick start's job, in a registry of its own, safe to repeat."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import random_mask

from chx_masks import MaskRegistry

EIGER4M = "eiger4m_single_image"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def snapshot(directory: Path) -> tuple:
    """Every mask version and active set of an embedded registry."""
    with MaskRegistry.embedded(directory) as reg:
        records = reg.search(all_versions=True, include_retired=True)
        versions = tuple((r.detector, r.name, r.version, r.uid, r.sha256) for r in records)
        return versions, tuple(reg.active_history(EIGER4M))


def demo(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chx_masks", "demo", "--frames", "2", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_demo_never_touches_the_users_registry_and_repeats_without_new_versions(tmp_path):
    real = tmp_path / "real"
    with MaskRegistry.embedded(real) as reg:
        reg.register_mask(EIGER4M, "beamstop", random_mask((2167, 2070), seed=3))
        gaps = np.ones((2167, 2070), bool)
        gaps[1000:1010] = False
        reg.register_mask(EIGER4M, "module_gaps", gaps)
        reg.activate(EIGER4M, ["module_gaps", "beamstop"], note="sample B")
    before = snapshot(real)

    env = {**os.environ, "CHX_MASKS_DIR": str(real)}
    first = demo(env, "--json")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["replay_equal"] and summary["lazy_equal"] and summary["frames"] == 2
    assert Path(summary["directory"]) == real / "demo"
    for path in summary["pngs"].values():
        assert Path(path).read_bytes()[:8] == PNG_MAGIC
        assert Path(path).is_relative_to(real / "demo")
    assert snapshot(real) == before

    demo_before = snapshot(real / "demo")
    assert {v[2] for v in demo_before[0]} == {0} and len(demo_before[1]) == 1
    # Again, now with a facility server configured that cannot be reached: the
    # demo opens neither it nor the user's registry, and registers nothing new.
    env["CHX_MASKS_URI"] = f"http://127.0.0.1:{closed_port()}"
    second = demo(env)
    assert second.returncode == 0, second.stderr
    assert "unchanged  eiger4m_single_image/demo_module_gaps   v0" in second.stdout
    assert f"chx-masks --dir {real / 'demo'} process " in second.stdout
    assert snapshot(real / "demo") == demo_before
    assert snapshot(real) == before

    # The command the demo prints processes its run, from its own directory.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chx_masks",
            "--dir",
            str(real / "demo"),
            "process",
            summary["raw_uid"],
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    product = json.loads(proc.stdout)
    assert product["parent_uid"] == summary["raw_uid"] and product["frames"] == {EIGER4M: 2}


def test_the_demo_refuses_a_shared_registry_before_doing_anything(tmp_path):
    from click.testing import CliRunner

    from chx_masks._cli import main

    result = CliRunner().invoke(
        main,
        ["--uri", f"http://127.0.0.1:{closed_port()}", "demo", "--dir", str(tmp_path / "d")],
    )
    assert result.exit_code == 2
    assert "never writes to a shared one" in result.output
    assert not (tmp_path / "d").exists()
