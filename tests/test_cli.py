"""The ``chx-masks`` command: every command, its output and its error exits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import EIGER500K, SHAPE_500K, random_mask

import chx_masks
from chx_masks import MaskRegistry
from chx_masks._cli import main

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
    out = subprocess.run(
        [sys.executable, "-m", "chx_masks", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in (
        "detectors",
        "detector",
        "list",
        "history",
        "show",
        "register",
        "update",
        "import",
        "generate",
        "delete",
        "export",
        "composite",
        "activate",
        "active",
        "demo",
    ):
        assert f"  {command} " in out or f"  {command}\n" in out, command


def test_detectors_table_and_json(reg):
    out = ok("detectors")
    assert "eiger4m_single_image" in out and "2167 x 2070" in out and "4,485,690" in out
    assert reg.detector in out
    rows = json.loads(ok("detectors", "--json"))
    mine = next(r for r in rows if r["detector"] == reg.detector)
    assert mine == {
        "detector": reg.detector,
        "shape": list(SHAPE_500K),
        "builtin": False,
        "metadata": {},
        "active": None,
        "missing": [],
    }


def test_register_list_history_show(reg, tmp_path):
    det = reg.detector
    mask = random_mask(fraction=0.02, seed=4)
    out = ok(
        "register", det, "gaps", str(npy(tmp_path, mask)), "-m", "sample=silica", "-m", "run=[1, 2]"
    )
    assert f"registered {det}/gaps v0" in out
    uid0 = reg.get_mask_uid(det, "gaps")
    assert reg.describe(uid0).metadata["sample"] == "silica"
    assert reg.describe(uid0).metadata["run"] == [1, 2]
    assert reg.describe(uid0).metadata["source"]["format"] == "npy"
    np.testing.assert_array_equal(reg.get_mask(det, "gaps").compute(), mask)

    out = ok(
        "update",
        det,
        "gaps",
        str(npy(tmp_path, ~(~mask | np.eye(*SHAPE_500K, dtype=bool)), "v1.npy")),
    )
    assert f"updated {det}/gaps v1" in out
    assert reg.describe(reg.get_mask_uid(det, "gaps")).metadata["sample"] == "silica"

    listing = ok("list", det)
    header, row = listing.splitlines()[:2]
    assert header.split() == ["detector", "name", "version", "uid", "masked", "registered", "at"]
    assert row.split()[:4] == [det, "gaps", "1", reg.get_mask_uid(det, "gaps")[:8]]
    current = reg.describe(reg.get_mask_uid(det, "gaps"))
    assert row.split()[4:6] == [f"{current.masked_pixels:,}", f"({current.masked_fraction:.3%})"]

    history = json.loads(ok("history", det, "gaps", "--json"))
    # "state"/"current", not "active": an active set is another thing.
    assert [(h["version"], h["state"], h["current"]) for h in history] == [
        (0, "superseded", False),
        (1, "current", True),
    ]
    assert all("active" not in h for h in history)
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
    assert f"active for {det} from the next run: a, b (active set v0" in out
    assert out.count(det) == 1
    assert "a v0 & b v0" in ok("composite", det)
    ok("activate", det, "b")
    rows = json.loads(ok("active", det, "--history", "--json"))
    assert [(r["names"], r["note"]) for r in rows] == [(["a", "b"], "sample 3"), (["b"], None)]
    assert det in ok("active") and "sample 3" not in ok("active", det)
    assert json.loads(ok("detectors", "--json"))[0]["active"] is None or True
    mine = next(r for r in json.loads(ok("detectors", "--json")) if r["detector"] == det)
    assert mine["active"] == ["b"]
    out = ok("activate", det, "--none")
    assert out.startswith(f"active for {det} from the next run: no masks chosen (active set v2")
    assert out.rstrip().endswith(
        "runs use the preprocessor's configured fallback masks (the profile's CHX_MASKS_FALLBACK)."
    )
    assert reg.active_set(det).names == ()
    table = ok("active", det)
    assert "(none)" in table and "CHX_MASKS_FALLBACK" in table


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
    assert out == (
        f"wrote mask {tmp_path / 'bs.edf'} ({det}/bs v0; nonzero = masked, as "
        "pyFAI and fabio read it)\n"
    )
    fails("export", det, "bs", str(tmp_path / "bs.edf"), fragment="add --force")
    ok("export", det, "bs", str(tmp_path / "bs.edf"), "--force")
    # The .edf holds pyFAI's convention (1 = masked); reading it back gives the mask.
    from chx_masks.io import read_mask

    np.testing.assert_array_equal(read_mask(tmp_path / "bs.edf")[0], mask)

    files = [npy(tmp_path, random_mask(seed=20 + i), f"m{i}.npy") for i in range(3)]
    rows = json.loads(ok("import", det, *map(str, files), "--json"))
    assert [(r["name"], r["outcome"], r["version"]) for r in rows] == [
        ("m0", "registered", 0),
        ("m1", "registered", 0),
        ("m2", "registered", 0),
    ]
    # The same files again: nothing to do, and said so.
    rows = json.loads(ok("import", det, *map(str, files[:2]), "--update", "--json"))
    assert [(r["name"], r["outcome"], r["version"]) for r in rows] == [
        ("m0", "unchanged", 0),
        ("m1", "unchanged", 0),
    ]
    assert [r["uid"] for r in rows] == [reg.get_mask_uid(det, n) for n in ("m0", "m1")]
    # Other content under a registered name: skipped, or a version with --update.
    (tmp_path / "other").mkdir()
    changed = npy(tmp_path / "other", random_mask(seed=30), "m0.npy")
    table = ok("import", det, str(changed))
    assert "skipped" in table and "--update adds a version" in table
    rows = json.loads(ok("import", det, str(changed), "--update", "--json"))
    assert rows[0]["outcome"] == "updated" and rows[0]["version"] == 1
    rows = json.loads(ok("import", det, str(changed), "--update", "--force", "--json"))
    assert rows[0]["outcome"] == "updated" and rows[0]["version"] == 2
    assert len(reg.history(det, "m0")) == 3


def test_generate_commands(reg, tmp_path):
    det = reg.detector
    out = ok(
        "generate",
        "circle",
        det,
        "bs",
        "--center",
        "200",
        "500",
        "--radius",
        "20",
        "--png",
        str(tmp_path / "bs.png"),
    )
    assert f"registered {det}/bs v0" in out and (tmp_path / "bs.png").exists()
    source = reg.describe(reg.get_mask_uid(det, "bs")).metadata["source"]
    assert source["generator"] == "circle" and source["parameters"]["radius"] == 20

    ok(
        "generate",
        "rectangle",
        det,
        "arm",
        "--top-left",
        "0",
        "495",
        "--bottom-right",
        "200",
        "505",
        "--grow",
        "1",
    )
    arm = reg.get_mask(det, "arm").compute()
    assert not arm[100, 494] and arm[100, 490]

    ok(
        "generate",
        "polygon",
        det,
        "wedge",
        "--vertex",
        "10.5",
        "10.5",
        "--vertex",
        "10.5",
        "60.5",
        "--vertex",
        "60.5",
        "10.5",
    )
    assert not reg.get_mask(det, "wedge").compute()[20, 20]

    dry = json.loads(
        ok(
            "generate",
            "circle",
            det,
            "dry",
            "--center",
            "1",
            "1",
            "--radius",
            "3",
            "--dry-run",
            "--json",
        )
    )
    assert dry["source"]["generator"] == "circle"
    assert "dry" not in {n for _, n in reg.get_masks(det)}

    darks = np.zeros((4, *SHAPE_500K), dtype=np.uint32)
    darks[:, 7, 9] = 100
    np.save(tmp_path / "darks.npy", darks)
    ok("generate", "hot-pixels", det, "hot", str(tmp_path / "darks.npy"), "--threshold", "10")
    hot = reg.get_mask(det, "hot").compute()
    assert [tuple(int(i) for i in p) for p in np.argwhere(~hot)] == [(7, 9)]

    ok("generate", "module-gaps", "eiger1m_single_image", f"gaps_{det}", "--dry-run")
    out = ok("generate", "chip-lines", "eiger500K_single_image", f"chips_{det}", "--width", "1")
    assert "registered eiger500K_single_image/chips_" in out


def test_versions_say_who_made_them_and_how_many_pixels(reg, tmp_path):
    det = reg.detector
    few = np.ones(SHAPE_500K, dtype=bool)
    few[3, 4] = few[500, 1000] = False  # 2 of 529,420 pixels: "0.000%" would hide them
    out = ok("register", det, "few", str(npy(tmp_path, few)))
    uid = reg.get_mask_uid(det, "few")
    who = reg.describe(uid).created_by
    assert who == reg.identity and who
    assert out == f"registered {det}/few v0  uid {uid}  masks 2 pixels (0.00038%)  by {who}\n"

    shown = ok("show", "--uid", uid[:8])  # the short uid `list` prints
    assert f"  {'registered by':<14} {who}\n" in shown
    assert f"  {'masked':<14} 2 pixels (0.00038%)\n" in shown
    data = json.loads(ok("show", "--uid", uid[:8], "--json"))
    assert (data["uid"], data["created_by"], data["state"], data["current"]) == (
        uid,
        who,
        "current",
        True,
    )
    assert "active" not in data

    header, row = ok("history", det, "few").splitlines()[:2]
    assert header.split() == [
        "version",
        "uid",
        "masked",
        "registered",
        "at",
        "by",
        "until",
        "state",
    ]
    assert row.split()[:4] == ["0", uid, "2", "(0.00038%)"] and f"  {who}  " in row
    assert [h["created_by"] for h in json.loads(ok("history", det, "few", "--json"))] == [who]
    assert "2 (0.00038%)" in ok("list", det)
    dry = ok("generate", "circle", det, "dot", "--center", "5", "5", "--radius", "0.5", "--dry-run")
    assert dry == f"would register {det}/dot: masks 1 pixel (0.00019%)\n"


def test_update_says_metadata_is_replaced_and_identical_needs_force(reg, tmp_path):
    det = reg.detector
    path = npy(tmp_path, random_mask(seed=40))
    ok("register", det, "bs", str(path), "-m", "sample=silica", "-m", "note=old")
    assert "-m replaces all of it" in " ".join(ok("update", "--help").split())

    before = state(reg)
    out = fails("update", det, "bs", str(path), fragment="already holds exactly this mask")
    assert "Add --force" in out and "force=True" not in out
    assert state(reg) == before

    out = ok("update", det, "bs", str(path), "--force", "-m", "sample=glass")
    first, second = out.splitlines()
    assert first.startswith(f"updated {det}/bs v1  uid ")
    assert second == '  metadata replaced: now {"sample": "glass"}; dropped {"note": "old"}'
    record = reg.describe(reg.get_mask_uid(det, "bs"))
    assert record.version == 1 and record.metadata["sample"] == "glass"
    assert "note" not in record.metadata
    # Without -m nothing is replaced, and nothing says so.
    out = ok("update", det, "bs", str(npy(tmp_path, random_mask(seed=41), "v2.npy")))
    assert (
        "metadata replaced" not in out
        and reg.describe(reg.get_mask_uid(det, "bs")).metadata["sample"] == "glass"
    )
    data = json.loads(ok("update", det, "bs", str(path), "-m", "x=1", "--json"))
    assert data["metadata_replaced"] == {"dropped": {"sample": "glass"}}
    assert data["version"] == 3

    # generate --update follows the same rule.
    circle = ("generate", "circle", det, "c", "--center", "10", "10", "--radius", "3")
    ok(*circle)
    before = state(reg)
    fails(*circle, "--update", fragment="Add --force")
    assert state(reg) == before
    assert f"updated {det}/c v1" in ok(*circle, "--update", "--force")
    assert reg.describe(reg.get_mask_uid(det, "c")).metadata["source"]["generator"] == "circle"


def test_delete_of_an_active_name_is_refused_unless_forced(reg):
    det = reg.detector
    reg.register_mask(det, "a", random_mask(seed=42))
    reg.register_mask(det, "b", random_mask(seed=43))
    reg.activate(det, ["a", "b"], note="sample 9")
    before = state(reg)
    for args in (("--yes",), ()):
        result = run("delete", det, "a", *args)
        assert result.exit_code == 1, result.output
        # Refused before any question: no prompt for a deletion that cannot happen.
        assert "[y/N]" not in result.output
        assert result.output.startswith(f"chx-masks: {det}/a is in the active set of {det}")
        assert f"`chx-masks activate {det} b`" in result.output
        assert "add --force" in result.output and "activate(" not in result.output
    assert state(reg) == before

    result = run("delete", det, "a", "--force", input="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output
    assert (
        f"Retire {det}/a (v0)? The active set of {det} (v0: a, b) names it; it becomes "
        "b. Its uids stay readable [y/N]"
    ) in result.output
    assert state(reg) == before

    out = ok("delete", det, "a", "--force", input="y\n")
    assert f"retired {det}/a at v0" in out
    assert f"active for {det} from the next run: b (active set v1" in out
    assert reg.active_set(det).names == ("b",)
    assert "a" not in {n for _, n in reg.get_masks(det)}
    data = json.loads(ok("delete", det, "b", "--force", "--yes", "--json"))
    assert data["state"] == "retired" and data["active_set"]["names"] == []


def test_active_and_detectors_flag_names_that_are_not_current(reg):
    det = reg.detector
    reg.register_mask(det, "a", random_mask(seed=44))
    reg.register_mask(det, "old", random_mask(seed=45))
    reg.activate(det, ["a"])
    reg.delete_mask(det, "old")
    # An active set naming a retired and an unknown mask, as chx-masks before
    # delete refused active names left them; no public call writes one now.
    reg._claim_active(reg._active_node(det), det, ("a", "old", "ghost"), "from before")
    table = ok("active", det)
    assert "a, old (not registered: retired), ghost (not registered)" in table
    assert (
        f"Runs on {det} cannot resolve old, ghost: register them, or choose masks "
        f"without them with `chx-masks activate {det} NAME...`."
    ) in table
    (row,) = json.loads(ok("active", det, "--json"))
    assert row["names"] == ["a", "old", "ghost"] and row["missing"] == ["old", "ghost"]
    mine = next(r for r in json.loads(ok("detectors", "--json")) if r["detector"] == det)
    assert mine["active"] == ["a", "old", "ghost"] and mine["missing"] == ["old", "ghost"]
    assert "old (not registered: retired)" in ok("detectors")
    # Only the current set is checked: an earlier one that named them resolved then.
    rows = json.loads(ok("active", det, "--history", "--json"))
    assert [r["missing"] for r in rows] == [[], ["old", "ghost"]]


def test_active_history_of_every_detector(reg):
    det, other = reg.detector, f"{reg.detector}_2"
    reg.register_detector(other, SHAPE_500K)
    for d in (det, other):
        reg.register_mask(d, "a", random_mask(seed=46))
        reg.activate(d, ["a"], note=f"{d} first")
    reg.deactivate(det, note="no sample")
    rows = [
        (r["detector"], r["version"], r["note"], r["created_by"])
        for r in json.loads(ok("active", "--history", "--json"))
        if r["detector"] in (det, other)
    ]
    assert rows == [
        (det, 0, f"{det} first", reg.identity),
        (det, 1, "no sample", reg.identity),
        (other, 0, f"{other} first", reg.identity),
    ]
    table = ok("active", "--history")
    assert f"{det} first" in table and f"{other} first" in table and "no sample" in table


def test_detector_add(reg, tmp_path):
    name = f"{reg.detector}_pilatus"
    out = ok("detector", "add", name, "43", "98", "-m", "vendor=dectris")
    assert out == f"added detector {name} 43 x 98 (4,214 pixels)\n"
    record = reg.get_detector(name)
    assert record.shape == (43, 98) and record.metadata["vendor"] == "dectris"
    assert ok("detector", "add", name, "43", "98") == (
        f"already known: {name} 43 x 98 (4,214 pixels)\n"
    )
    before = [(d.name, d.shape) for d in reg.detectors()]
    fails("detector", "add", name, "98", "43", fragment="already known with shape 43x98")
    assert [(d.name, d.shape) for d in reg.detectors()] == before
    assert json.loads(ok("detector", "list", "--json")) == json.loads(ok("detectors", "--json"))
    ok("register", name, "m", str(npy(tmp_path, np.ones((43, 98), bool))))
    assert reg.get_masks(name) == [(name, "m")]


def test_export_says_the_convention_it_wrote(reg, tmp_path):
    det = reg.detector
    mask = random_mask(seed=47)
    uid = reg.register_mask(det, "bs", mask)
    reg.update_mask(det, "bs", ~mask)
    masked = "nonzero = masked, as pyFAI and fabio read it"
    kept = "True = kept, as chx-masks reads it"
    cases = [
        ("m.edf", (), "masked-nonzero", masked),
        ("m.msk", (), "masked-nonzero", masked),
        ("m.h5", (), "masked-nonzero", masked),
        ("m.txt", (), "masked-nonzero", "lists the masked pixels"),
        ("m.npy", (), "keep", kept),
        ("m.npz", (), "keep", kept),
        ("pyfai.tif", ("--convention", "masked-nonzero"), "masked-nonzero", masked),
        ("kept.tif", ("--convention", "keep"), "keep", kept),
        ("kept.edf", ("--convention", "keep"), "keep", kept),
    ]
    from chx_masks.io import read_mask

    for name, extra, convention, words in cases:
        path = tmp_path / name
        out = ok("export", det, "bs", str(path), "--uid", uid[:8], *extra)
        assert out == f"wrote mask {path} ({det}/bs v0; {words})\n", out
        shape = SHAPE_500K if name.endswith(".txt") else None
        np.testing.assert_array_equal(read_mask(path, convention=convention, shape=shape)[0], mask)
        data = json.loads(ok("export", det, "bs", str(path), "--force", "--json", *extra))
        assert (data["convention"], data["meaning"], data["version"], data["uid"]) == (
            convention,
            words,
            1,
            reg.get_mask_uid(det, "bs"),
        )
    import tifffile

    np.testing.assert_array_equal(tifffile.imread(tmp_path / "pyfai.tif") != 0, mask)


# ------------------------------------------------------------------- errors

#: Python's words, which a command's message must not use (the flag or command instead).
PYTHON_WORDS = (
    "convention=",
    "format=",
    "dataset=",
    "as_of=",
    "force=True",
    "allow_pickle",
    "register_detector(",
    "update_mask(",
    "register_mask(",
    "activate(",
    "use mask.T",
    ".item()",
    "unsafely",
)


def test_errors_name_the_commands_and_flags(reg, tmp_path):
    det = reg.detector
    m = random_mask(seed=48)
    reg.register_mask(det, "m", m)
    reg.register_mask(det, "inuse", random_mask(seed=49))
    reg.activate(det, ["inuse"])
    uid = reg.get_mask_uid(det, "m")
    good = npy(tmp_path, random_mask(seed=50))
    same = npy(tmp_path, m, "same.npy")
    ints = npy(tmp_path, random_mask(seed=51).astype(np.uint8), "ints.npy")
    flags = npy(tmp_path, np.where(random_mask(seed=52), 0, 5).astype(np.uint8), "flags.npy")
    transposed = npy(tmp_path, np.ones(SHAPE_500K[::-1], bool), "transposed.npy")
    unknown = tmp_path / "mask.dat"
    unknown.write_bytes(b"0")
    two = tmp_path / "two.npz"
    np.savez(two, gap=m, other=m)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"beamstop": 1}], dtype=object), allow_pickle=True)
    import h5py

    no_mask = tmp_path / "no_mask.h5"
    with h5py.File(no_mask, "w") as f:
        f["/entry/data/frame"] = np.zeros((2, 2))
    before = state(reg)
    cases = [
        (
            ("register", det, "x", str(ints)),
            "Give --convention keep (1 = pixel kept, as in "
            "chx-masks) or --convention masked-nonzero (nonzero = masked, as in pyFAI).",
        ),
        (
            ("register", det, "x", str(flags), "--convention", "keep"),
            "which --convention keep cannot read; is it --convention masked-nonzero?",
        ),
        (
            ("register", det, "x", str(transposed)),
            "It is transposed (rows and columns swapped): save the transposed array",
        ),
        (("register", det, "x", str(unknown)), "or give --format (one of npy, npz"),
        (("register", det, "x", str(two)), "or give --dataset NAME naming the mask."),
        (("register", det, "x", str(no_mask)), "Give --dataset PATH naming the mask."),
        (
            ("register", det, "x", str(objects)),
            "holds Python objects (pickled data), not a mask array, and is refused",
        ),
        (
            ("register", det, "x", str(good), "-m", "a.b=1"),
            """give a JSON object instead, e.g. -m 'sample={"name": "silica"}'.""",
        ),
        (("register", det, "x", str(good), "-m", "x=NaN"), "Give that -m value as a string"),
        (
            ("show", det, "m", "--as-of", "yesterday-ish"),
            "--as-of 'yesterday-ish' is not an ISO 8601 time",
        ),
        (("register", det, "m", str(good)), f"`chx-masks update {det} m FILE`"),
        (("update", det, "m", str(same)), "Add --force to register an identical version"),
        (
            ("register", "no_such_det", "x", str(good)),
            "`chx-masks detector add no_such_det ROWS COLS`",
        ),
        (("list", "eiger4m"), "Did you mean 'eiger4m_single_image'?"),
        (
            ("export", det, "m", str(tmp_path / "out.tif")),
            "--convention masked-nonzero (pyFAI, fabio) or --convention keep (chx-masks).",
        ),
        (
            ("export", det, "m", str(tmp_path / "out.npy"), "--uid", uid, "--version", "0"),
            "Give --version or --uid, not both.",
        ),
        (("delete", det, "inuse", "--yes"), "or add --force to remove it from the active set"),
    ]
    wrong = []
    for args, fragment in cases:
        try:
            out = fails(*args, fragment=fragment)
            said = [w for w in PYTHON_WORDS if w in out]
            assert not said, f"Python advice {said}: {out}"
        except AssertionError as err:
            wrong.append(f"{args}: {err}")
    assert wrong == []
    assert state(reg) == before
    assert not (tmp_path / "out.tif").exists() and not (tmp_path / "out.npy").exists()


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
        (
            ("generate", "hot-pixels", det, "h", str(good), "--threshold", "1"),
            "(frames, rows, cols)",
        ),
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
        (("detector", "add", "d", "0", "10"), "0 is not in the range x>=1"),
        (("detector", "add", "d", "ten", "10"), "'ten' is not a valid integer"),
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
        [
            sys.executable,
            "-m",
            "chx_masks",
            "--uri",
            "http://127.0.0.1:9/api/v1",
            "--api-key",
            "secret-key-123",
            "list",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    *before, last = proc.stderr.strip().splitlines()
    assert last.startswith("chx-masks: Cannot reach the mask registry")
    # tiled says it is retrying (a spinner on a terminal); nothing else is printed.
    assert set(before) <= {"Retrying…"} and "Traceback" not in proc.stderr
    assert "secret-key-123" not in proc.stderr + proc.stdout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_registry_advice_matches_how_it_was_chosen(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}/api/v1"
    cases = [
        (["--uri", uri, "list"], {}, "(given with --uri)"),
        (
            ["list"],
            {"CHX_MASKS_URI": uri},
            "(from $CHX_MASKS_URI; unset it to use the embedded registry)",
        ),
        (
            ["detectors"],
            {"CHX_MASKS_PROFILE": "no_such_profile"},
            "(from $CHX_MASKS_PROFILE; unset it to use the embedded registry)",
        ),
        (["--profile", "no_such_profile", "list"], {}, "(--profile no_such_profile)"),
    ]
    for args, env, origin in cases:
        result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
        assert result.exit_code == 1, (args, result.output)
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("chx-masks: ") and last.endswith(f" {origin}"), (args, last)
        if "--uri" in args:
            assert f"Check that the tiled server at {uri}" in last
            # The advice is about what the user gave, not a variable they did not set.
            assert "CHX_MASKS_URI" not in last, last
        else:
            assert last.count("unset") <= 1, last


def test_process_without_prefect_does_not_import_it(tmp_path):
    """Importing Prefect prints its telemetry notice on a terminal; no flow runs here."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from chx_masks._cli import main\n"
        "r = CliRunner().invoke(main, ['--dir', sys.argv[1], 'process', 'some-run',\n"
        "                              '--runs', sys.argv[2]])\n"
        "print(r.exit_code, 'prefect' in sys.modules)\n"
        "print(r.output)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "reg"), str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    status, output = proc.stdout.split("\n", 1)
    assert status == "1 False", proc.stdout + proc.stderr
    assert output.startswith(f"chx-masks: No run store at {tmp_path / 'runs'}")


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
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    (row,) = json.loads(proc.stdout)
    assert (row["detector"], row["name"], row["version"]) == (EIGER500K, "m", 0)
    # Not a terminal: no colour codes in a table either.
    table = subprocess.run(
        [sys.executable, "-m", "chx_masks", "--dir", str(directory), "list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "\x1b[" not in table and table.splitlines()[0].startswith("detector")
