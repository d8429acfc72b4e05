"""The layers DESIGN describes: chx_masks below, bluesky_callbacks on top.

The registry library imports nothing from the Bluesky integration; the
integration and the IPython profile use only chx_masks' public modules; and
every ``chx-masks`` command loads, and says what it needs, without the
Bluesky extra.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in ``path``, ``from a import b`` giving ``a.b`` too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).glob("*.py"))


def test_the_registry_library_imports_nothing_from_the_bluesky_integration():
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in _sources("chx_masks")
        for line, module in _imports(path)
        if module.split(".")[0] == "bluesky_callbacks"
    ]
    assert offending == []


def test_tests_import_shared_helpers_from_helpers_never_from_conftest():
    sources = _sources("tests")
    assert len(sources) > 30
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sources
        for line, module in _imports(path)
        if module.split(".")[0] == "conftest"
    ]
    assert offending == []


def test_nothing_outside_chx_masks_imports_a_private_chx_masks_module():
    sources = _sources("bluesky_callbacks", "profile_snippets")
    assert len(sources) > 10
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sources
        for line, module in _imports(path)
        if module.startswith("chx_masks.")
        and any(part.startswith("_") for part in module.split(".")[1:])
    ]
    assert offending == []


def test_the_scan_sees_private_imports_in_every_form(tmp_path):
    # The checks above find nothing; this shows they would find each form.
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import chx_masks._cli\nfrom chx_masks import _plot\n"
        "from chx_masks._hdf5 import h5py_with_filters\n"
        "def f():\n    from bluesky_callbacks._demo import run_demo\n"
    )
    modules = [m for _, m in _imports(sample)]
    assert {
        "chx_masks._cli",
        "chx_masks._plot",
        "chx_masks._hdf5",
        "bluesky_callbacks._demo",
    } <= set(modules)


# Run in a fresh process where the Bluesky extra's packages cannot be imported.
_WITHOUT_BLUESKY = r"""
import importlib.abc, json, sys

BLOCKED = {"bluesky", "ophyd", "ophyd_async", "event_model", "bluesky_tiled_plugins",
           "databroker", "prefect"}

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())

import click
from click.testing import CliRunner
from chx_masks._cli import main

runner = CliRunner()
names = main.list_commands(click.Context(main))
results = {name: runner.invoke(main, [name, "--help"]).exit_code for name in names}
demo = runner.invoke(main, ["demo", "--dir", sys.argv[1]])
print(json.dumps({"help": results, "demo": [demo.exit_code, demo.output],
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


def test_every_command_loads_without_the_bluesky_extra(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_BLUESKY, str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert {"process", "demo", "list", "register", "serve"} <= set(result["help"])
    assert {name: code for name, code in result["help"].items() if code != 0} == {}
    code, output = result["demo"]
    assert code == 1
    assert output.startswith("chx-masks: The demo needs Bluesky (bluesky is missing)")
    assert 'pip install "chx-masks[all]"' in output
    assert result["loaded"] == []
    assert not (tmp_path / "demo").exists()  # refused: nothing written


@pytest.mark.parametrize("module", ["chx_masks.cli", "chx_masks.plot", "chx_masks.stores"])
def test_public_modules_export_what_they_name(module):
    import importlib

    imported = importlib.import_module(module)
    missing = [name for name in imported.__all__ if not hasattr(imported, name)]
    assert missing == []
    assert imported.__doc__
