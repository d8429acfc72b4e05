"""The ``chx-masks`` command: every command, its output and its error exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import chx_masks
from chx_masks import MaskRegistry
from chx_masks._cli import main
from conftest import EIGER500K, SHAPE_500K, random_mask

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One embedded registry for the module (opening one costs seconds)."""
    reg = MaskRegistry.embedded(tmp_path_factory.mktemp("cli-registry"))
    yield reg
    reg.close()


@pytest.fixture
def reg(shared, request):
    """The shared registry as the default, and a detector unique to this test."""
    chx_masks.set_default_registry(shared)
    detector = f"det_{request.node.name.replace('[', '_').replace(']', '')[:40]}"
    shared.register_detector(detector, SHAPE_500K)
    shared.detector = detector  # the tests' own detector
    yield shared
    chx_masks.set_default_registry(None)


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def ok(*args: str, input: str | None = None) -> str:
    result = run(*args, input=input)
    assert result.exit_code == 0, result.output
    return result.stdout


def fails(*args: str, fragment: str, code: int = 1) -> str:
    result = run(*args)
    assert result.exit_code == code, result.output
    assert fragment in result.output, result.output
    if code == 1:
        # One line, no traceback.
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines[-1].startswith("chx-masks: ") and "Traceback" not in result.output
    return result.output


def npy(tmp_path: Path, mask: np.ndarray, name: str = "mask.npy") -> Path:
    path = tmp_path / name
    np.save(path, mask)
    return path


def state(reg) -> tuple:
    """Everything a refused call must leave unchanged."""
    det = reg.detector
    records = reg.search(detector=det, all_versions=True, include_retired=True)
    return tuple((r.name, r.version, r.uid, r.sha256) for r in records), reg.active_history(det)


# ----------------------------------------------------------------- listings


def test_help_is_fast_and_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "chx_masks", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("detectors", "list", "history", "show", "register", "update", "import",
                    "generate", "delete", "export", "composite", "activate", "active", "demo"):
        assert f"  {command} " in out or f"  {command}\n" in out, command


def test_detectors_table_and_json(reg):
    out = ok("detectors")
    assert "eiger4m_single_image" in out and "2167 x 2070" in out and "4,485,690" in out
    assert reg.detector in out
    rows = json.loads(ok("detectors", "--json"))
    mine = next(r for r in rows if r["detector"] == reg.detector)
    assert mine == {"detector": reg.detector, "shape": list(SHAPE_500K), "builtin": False,
                    "metadata": {}, "active": None}


def test_register_list_history_show(reg, tmp_path):
    det = reg.detector
    mask = random_mask(fraction=0.02, seed=4)
    out = ok("register", det, "gaps", str(npy(tmp_path, mask)), "-m", "sample=silica",
             "-m", "run=[1, 2]")
    assert f"registered {det}/gaps v0" in out
    uid0 = reg.get_mask_uid(det, "gaps")
    assert reg.describe(uid0).metadata["sample"] == "silica"
    assert reg.describe(uid0).metadata["run"] == [1, 2]
    assert reg.describe(uid0).metadata["source"]["format"] == "npy"
    np.testing.assert_array_equal(reg.get_mask(det, "gaps").compute(), mask)

    out = ok("update", det, "gaps", str(npy(tmp_path, ~(~mask | np.eye(*SHAPE_500K, dtype=bool)),
                                            "v1.npy")))
    assert f"updated {det}/gaps v1" in out
    assert reg.describe(reg.get_mask_uid(det, "gaps")).metadata["sample"] == "silica"

    listing = ok("list", det)
    header, row = listing.splitlines()[:2]
    assert header.split() == ["detector", "name", "version", "uid", "masked", "registered", "at"]
    assert row.split()[:4] == [det, "gaps", "1", reg.get_mask_uid(det, "gaps")[:8]]
    assert row.split()[4].endswith("%")

    history = json.loads(ok("history", det, "gaps", "--json"))
    assert [(h["version"], h["active"]) for h in history] == [(0, False), (1, True)]
    table = ok("history", det, "gaps")
    assert "superseded" in table and "current" in table

    shown = ok("show", det, "gaps", "--version", "0")
    assert uid0 in shown and "superseded" in shown and '"sample": "silica"' in shown
    by_uid = json.loads(ok("show", "--uid", uid0, "--json"))
    assert by_uid["version"] == 0 and by_uid["uid"] == uid0
    assert by_uid["masked_pixels"] == int((~mask).sum())


def test_show_and_composite_write_pictures(reg, tmp_path):
    det = reg.detector
    reg.register_mask(det, "a", random_mask(seed=5))
    reg.register_mask(det, "b", random_mask(seed=6))
    out = ok("show", det, "a", "--png", str(tmp_path / "a.png"))
    assert f"wrote picture {tmp_path / 'a.png'}" in out
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC

    out = ok("composite", det, "a", "b", "--explain", "--png", str(tmp_path / "ab.png"))
    assert f"{det}: a v0 & b v0" in out and "only it" in out
    assert (tmp_path / "ab.png").read_bytes()[:8] == PNG_MAGIC
    data = json.loads(ok("composite", det, "a", "b", "--json"))
    expected = reg.resolve_composite(det, ["a", "b"])
    assert data["uids"] == list(expected.uids) and data["sha256"] == expected.sha256
    assert [c["name"] for c in data["components"]] == ["a", "b"]


def test_activate_active_and_composite_of_the_active_set(reg):
    det = reg.detector
    reg.register_mask(det, "a", random_mask(seed=7))
    reg.register_mask(det, "b", random_mask(seed=8))
    fails("composite", det, fragment="has no active set")
    out = ok("activate", det, "a", "b", "--note", "sample 3")
    assert f"active for {det} from the next run: {det}: a, b (active set v0" in out
    assert "a v0 & b v0" in ok("composite", det)
    ok("activate", det, "b")
    rows = json.loads(ok("active", det, "--history", "--json"))
    assert [(r["names"], r["note"]) for r in rows] == [(["a", "b"], "sample 3"), (["b"], None)]
    assert det in ok("active") and "sample 3" not in ok("active", det)
    assert json.loads(ok("detectors", "--json"))[0]["active"] is None or True
    mine = next(r for r in json.loads(ok("detectors", "--json")) if r["detector"] == det)
    assert mine["active"] == ["b"]
    ok("activate", det, "--none")
    assert reg.active_set(det).names == ()


def test_delete_asks_and_keeps_uids_readable(reg):
    det = reg.detector
    uid = reg.register_mask(det, "old", random_mask(seed=9))
    before = state(reg)
    result = run("delete", det, "old", input="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output
    assert state(reg) == before
    out = ok("delete", det, "old", input="y\n")
    assert f"retired {det}/old at v0" in out
    assert "old" not in ok("list", det)
    assert "retired" in ok("list", det, "--all")
    assert uid in ok("show", "--uid", uid)
    ok("register", det, "again", "--help")  # help works whatever the registry holds


def test_export_and_import_many_files(reg, tmp_path):
    det = reg.detector
    mask = random_mask(seed=10)
    reg.register_mask(det, "bs", mask)
    out = ok("export", det, "bs", str(tmp_path / "bs.edf"))
    assert "wrote mask" in out
    fails("export", det, "bs", str(tmp_path / "bs.edf"), fragment="add --force")
    ok("export", det, "bs", str(tmp_path / "bs.edf"), "--force")
    # The .edf holds pyFAI's convention (1 = masked); reading it back gives the mask.
    from chx_masks.io import read_mask

    np.testing.assert_array_equal(read_mask(tmp_path / "bs.edf")[0], mask)

    files = [npy(tmp_path, random_mask(seed=20 + i), f"m{i}.npy") for i in range(3)]
    rows = json.loads(ok("import", det, *map(str, files), "--json"))
    assert [(r["name"], r["outcome"], r["version"]) for r in rows] == [
        ("m0", "registered", 0), ("m1", "registered", 0), ("m2", "registered", 0)]
    table = ok("import", det, *map(str, files[:2]))
    assert "skipped" in table and "--update adds a version" in table
    rows = json.loads(ok("import", det, str(files[0]), "--update", "--json"))
    assert rows[0]["outcome"] == "updated" and rows[0]["version"] == 1


def test_generate_commands(reg, tmp_path):
    det = reg.detector
    out = ok("generate", "circle", det, "bs", "--center", "200", "500", "--radius", "20",
             "--png", str(tmp_path / "bs.png"))
    assert f"registered {det}/bs v0" in out and (tmp_path / "bs.png").exists()
    source = reg.describe(reg.get_mask_uid(det, "bs")).metadata["source"]
    assert source["generator"] == "circle" and source["parameters"]["radius"] == 20

    ok("generate", "rectangle", det, "arm", "--top-left", "0", "495",
       "--bottom-right", "200", "505", "--grow", "1")
    arm = reg.get_mask(det, "arm").compute()
    assert not arm[100, 494] and arm[100, 490]

    ok("generate", "polygon", det, "wedge", "--vertex", "10.5", "10.5", "--vertex", "10.5",
       "60.5", "--vertex", "60.5", "10.5")
    assert not reg.get_mask(det, "wedge").compute()[20, 20]

    dry = json.loads(ok("generate", "circle", det, "dry", "--center", "1", "1", "--radius", "3",
                        "--dry-run", "--json"))
    assert dry["source"]["generator"] == "circle"
    assert ("dry" not in {n for _, n in reg.get_masks(det)})

    darks = np.zeros((4, *SHAPE_500K), dtype=np.uint32)
    darks[:, 7, 9] = 100
    np.save(tmp_path / "darks.npy", darks)
    ok("generate", "hot-pixels", det, "hot", str(tmp_path / "darks.npy"), "--threshold", "10")
    hot = reg.get_mask(det, "hot").compute()
    assert [tuple(int(i) for i in p) for p in np.argwhere(~hot)] == [(7, 9)]

    ok("generate", "module-gaps", "eiger1m_single_image", f"gaps_{det}", "--dry-run")
    out = ok("generate", "chip-lines", "eiger500K_single_image", f"chips_{det}", "--width", "1")
    assert "registered eiger500K_single_image/chips_" in out


# ------------------------------------------------------------------- errors


def test_expected_errors_exit_1_with_one_line_and_change_nothing(reg, tmp_path):
    det = reg.detector
    reg.register_mask(det, "m", random_mask(seed=11))
    good = npy(tmp_path, random_mask(seed=12))
    wrong_shape = npy(tmp_path, np.ones((10, 10), bool), "small.npy")
    ints = npy(tmp_path, np.ones(SHAPE_500K, np.int64), "ints.npy")
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy")
    before = state(reg)
    cases = [
        (("register", det, "m", str(good)), "already registered"),
        (("register", det, "bad/name", str(good)), "bad/name"),
        (("register", det, "x", str(wrong_shape)), "10x10"),
        (("register", det, "x", str(ints)), "int64"),
        (("register", det, "x", str(junk)), "junk.npy"),
        (("register", "no_such_detector", "x", str(good)), "no_such_detector"),
        (("register", det, "x", str(good), "-m", "novalue"), "KEY=VALUE"),
        (("register", det, "x", str(good), "-m", "source=me"), "source"),
        (("update", det, "nope", str(good)), "nope"),
        (("history", det, "nope"), "nope"),
        (("show", det, "m", "--version", "7"), "no version 7"),
        (("show", det, "m", "--as-of", "yesterday-ish"), "yesterday-ish"),
        (("show", "--uid", "not-a-uid"), "not-a-uid"),
        (("show", "--uid", "0b7d2f0e-9a53-4b7e-8a3c-2b9f2c1d0e4f"), "No mask with uid"),
        (("delete", det, "nope", "--yes"), "nope"),
        (("composite", det, "m", "nope"), "nope"),
        (("activate", det, "nope"), "nope"),
        (("list", "no_such_detector"), "no_such_detector"),
        (("generate", "circle", det, "c", "--center", "0", "0", "--radius", "-1"), "radius"),
        (("generate", "polygon", det, "p", "--vertex", "1", "1"), "3"),
        (("generate", "hot-pixels", det, "h", str(good), "--threshold", "1"),
         "(frames, rows, cols)"),
        (("generate", "module-gaps", det, "g"), det),
        (("export", det, "nope", str(tmp_path / "out.npy")), "nope"),
    ]
    wrong = []
    for args, fragment in cases:
        try:
            fails(*args, fragment=fragment)
        except AssertionError as err:
            wrong.append(f"{args}: {err}")
    assert wrong == []
    assert state(reg) == before
    assert not (tmp_path / "out.npy").exists()


def test_usage_errors_exit_2():
    for args, fragment in [
        (("show",), "Give DETECTOR NAME"),
        (("show", "d", "n", "--uid", "u"), "--uid names one version"),
        (("activate", "d"), "--none"),
        (("active", "--history"), "needs a DETECTOR"),
        (("--uri", "http://x", "--dir", "/tmp/x", "list"), "not several"),
        (("register", "d", "n", "/no/such/file.npy"), "does not exist"),
        (("nonsense",), "No such command"),
    ]:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert fragment in result.output, (args, result.output)


def test_unreachable_registry_is_one_line_through_the_real_entry_point(tmp_path):
    env = {**os.environ, "TILED_RETRY_TIMEOUT": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "chx_masks", "--uri", "http://127.0.0.1:9/api/v1",
         "--api-key", "secret-key-123", "list"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    *before, last = proc.stderr.strip().splitlines()
    assert last.startswith("chx-masks: Cannot reach the mask registry")
    # tiled says it is retrying (a spinner on a terminal); nothing else is printed.
    assert set(before) <= {"Retrying…"} and "Traceback" not in proc.stderr
    assert "secret-key-123" not in proc.stderr + proc.stdout


def test_bad_directory_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    fails("--dir", str(blocker / "sub"), "list", fragment="Cannot create the embedded directory")


def test_json_list_through_the_real_entry_point(tmp_path):
    directory = tmp_path / "reg"
    with MaskRegistry.embedded(directory) as registry:
        registry.register_mask(EIGER500K, "m", random_mask(seed=13))
    proc = subprocess.run(
        [sys.executable, "-m", "chx_masks", "--dir", str(directory), "list", "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    (row,) = json.loads(proc.stdout)
    assert (row["detector"], row["name"], row["version"]) == (EIGER500K, "m", 0)
    # Not a terminal: no colour codes in a table either.
    table = subprocess.run(
        [sys.executable, "-m", "chx_masks", "--dir", str(directory), "list"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    assert "\x1b[" not in table and table.splitlines()[0].startswith("detector")


@pytest.mark.slow
def test_demo_through_the_real_entry_point(tmp_path):
    env = {**os.environ, "CHX_MASKS_DIR": str(tmp_path / "registry")}
    proc = subprocess.run(
        [sys.executable, "-m", "chx_masks", "demo", "--frames", "4", "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["replay_equal"] and summary["lazy_equal"] and summary["frames"] == 4
    assert set(summary["pngs"]) == {"composite", "raw_frame", "masked_frame"}
    for path in summary["pngs"].values():
        assert Path(path).read_bytes()[:8] == PNG_MAGIC
        assert Path(path).is_relative_to(tmp_path / "registry" / "demo")
    with MaskRegistry.embedded(tmp_path / "registry") as registry:
        active = registry.active_set("eiger4m_single_image")
        assert active.names == tuple(summary["masks"])
        for name, info in summary["masks"].items():
            assert registry.get_mask_uid("eiger4m_single_image", name) == info["uid"]
    # Again: versions, not failures.
    proc = subprocess.run(
        [sys.executable, "-m", "chx_masks", "demo", "--frames", "2"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "updated    eiger4m_single_image/demo_module_gaps   v1" in proc.stdout
    assert "equal to live: True" in proc.stdout
