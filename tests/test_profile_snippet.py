"""The profile snippet in real IPython: provenance, stored masked runs, active sets, outages.

Each test starts ``python -m IPython`` with a profile whose startup folder has
a base file creating ``RE`` and a copy of ``profile_snippets/95-chx-masks.py``;
the ``-c`` code prints one ``CHX-RESULT <json>`` line that the test reads.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import EIGER500K, SUMMARY, random_mask
from tiled.queries import Key

from bluesky_callbacks import open_run_store
from bluesky_callbacks.sim import sim_eiger500k
from chx_masks import MaskRegistry

# Four IPython starts of a few seconds each (tiled imports, embedded stores).
pytestmark = pytest.mark.slow

SNIPPET = Path(__file__).resolve().parents[1] / "profile_snippets" / "95-chx-masks.py"
MARK = "CHX-RESULT "
TIMEOUT = 180

BASE = """
from bluesky import RunEngine
from bluesky.plans import count
from bluesky_callbacks.sim import sim_eiger500k

RE = RunEngine({})
det = sim_eiger500k()
docs = []
RE.subscribe(lambda name, doc: docs.append((name, doc)))
"""

# Runs in IPython after the snippet: one scan, and what a user would check.
SCAN = """
import json
import numpy as np
from tiled.queries import Key

K = "eiger500K_single_image"

def scan(num):
    docs.clear()
    (uid,) = RE(count([det], num=num))
    start = docs[0][1]
    raw = np.stack([doc["data"][K] for name, doc in docs if name == "event"])
    result = {"uid": uid, "masks": start.get("masks"), "mask_uids": start.get("mask_uids"),
              "exit_status": docs[-1][1]["exit_status"], "events": len(raw)}
    derived = masked_run(uid)
    result.update(
        derived_count=len(chx_masks_runs().search(Key("parent_uid") == uid)),
        derived_parent=derived.metadata["start"]["parent_uid"],
        derived_exit=derived.metadata["stop"]["exit_status"],
    )
    uids = start["masks"][K]["uids"]
    if uids:
        mask = chx_masks_registry().composite_from_uids(uids).mask
        frames = derived["primary"][K].read()
        result.update(
            frames=len(frames),
            same_dtype=bool(frames.dtype == raw.dtype),
            max_abs_diff=int(np.abs(frames.astype(np.int64) - raw * mask).max()),
            masked_pixels_zero=bool((frames[:, ~mask] == 0).all()),
        )
    return result
"""


def _launch(
    workdir: Path,
    code: str,
    env: dict[str, str],
    *,
    base: str = BASE,
    after: str | None = None,
) -> subprocess.CompletedProcess:
    """Start IPython with profile ``chx`` (base file + snippet [+ ``after``]), run ``code``."""
    ipython_dir = workdir / "ipython"
    startup = ipython_dir / "profile_chx" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-base.py").write_text(base)
    shutil.copy(SNIPPET, startup / "95-chx-masks.py")
    if after is not None:
        (startup / "99-after.py").write_text(after)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CHX_MASKS_")}
    full_env.update(
        {
            "XDG_DATA_HOME": str(workdir / "xdg-data"),
            "XDG_CONFIG_HOME": str(workdir / "xdg-config"),
            "TILED_RETRY_TIMEOUT": "1",
            **env,
        }
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "IPython",
            "--ipython-dir",
            str(ipython_dir),
            "--profile=chx",
            "--no-banner",
            "--colors=nocolor",
            "-c",
            code,
        ],
        env=full_env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _explain(proc: subprocess.CompletedProcess) -> str:
    return (
        f"IPython exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
        f"\n--- stderr ---\n{proc.stderr[-6000:]}"
    )


def _result(proc: subprocess.CompletedProcess) -> object:
    assert proc.returncode == 0, _explain(proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert len(lines) == 1, _explain(proc)
    return json.loads(lines[0][len(MARK) :])


def _seed(directory: Path) -> dict[str, str]:
    """Three masks for the 500K, the active set chip_mask + beamstop (v0)."""
    with MaskRegistry.embedded(directory) as reg:
        uids = {
            name: reg.register_mask(EIGER500K, name, random_mask(seed=seed))
            for seed, name in enumerate(["chip_mask", "hot", "beamstop"], start=1)
        }
        reg.activate(EIGER500K, ["chip_mask", "beamstop"], note="sample A")
    return uids


# ------------------------------------------------- scans with the registry up


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One IPython session: four scans, the active set changed between them."""
    workdir = tmp_path_factory.mktemp("profile")
    registry_dir = workdir / "registry"
    uids = _seed(registry_dir)
    code = SCAN + textwrap.dedent("""
        import subprocess, sys
        results = {"first": scan(3)}
        masks_activate(K, ["chip_mask", "hot"], note="sample B")
        results["second"] = scan(2)
        # Another process (a second session, the CLI) changes the choice.
        subprocess.run([sys.executable, "-c",
                        "import os; from chx_masks import MaskRegistry\\n"
                        "with MaskRegistry.embedded(os.environ['CHX_MASKS_DIR']) as r:\\n"
                        "    r.activate('eiger500K_single_image', ['beamstop'])"],
                       check=True, timeout=120)
        results["third"] = scan(1)
        masks_activate(K, [])
        results["fourth"] = scan(1)
        results["fallback"] = CHX_MASKS_FALLBACK[K]
        print("CHX-RESULT " + json.dumps(results))
    """)
    proc = _launch(workdir, code, {"CHX_MASKS_DIR": str(registry_dir)})
    return {"proc": proc, "results": _result(proc), "uids": uids, "registry_dir": registry_dir}


def test_ipython_starts_with_one_line_and_exits_cleanly(session):
    proc = session["proc"]
    assert "Traceback" not in proc.stdout + proc.stderr, _explain(proc)
    announced = [line for line in proc.stdout.splitlines() if line.startswith("chx-masks:")]
    assert len(announced) == 1, _explain(proc)
    assert str(session["registry_dir"]) in announced[0]


def test_start_document_records_the_active_set(session):
    first = session["results"]["first"]
    uids = session["uids"]
    with MaskRegistry.embedded(session["registry_dir"]) as reg:
        composite = reg.composite_from_uids([uids["chip_mask"], uids["beamstop"]])
    assert first["exit_status"] == "success" and first["events"] == 3
    assert first["masks"] == {
        EIGER500K: {
            "names": ["chip_mask", "beamstop"],
            "uids": [uids["chip_mask"], uids["beamstop"]],
            "versions": [0, 0],
            "sha256": composite.sha256,
            "chosen_by": "active set v0",
        }
    }
    assert first["mask_uids"] == [uids["chip_mask"], uids["beamstop"]]


def test_masked_run_is_stored_findable_by_parent_uid_and_equals_raw_times_mask(session):
    for label, num in [("first", 3), ("second", 2), ("third", 1), ("fourth", 1)]:
        run = session["results"][label]
        assert run["derived_count"] == 1, label
        assert run["derived_parent"] == run["uid"], label
        assert run["derived_exit"] == "success", label
        assert run["frames"] == num, label
        assert run["same_dtype"] and run["masked_pixels_zero"], label
        assert run["max_abs_diff"] == 0, label


def test_masked_runs_persist_on_disk(session):
    """After IPython exits, a fresh client of the runs store finds them."""
    results = session["results"]
    expected = sim_eiger500k()
    store = open_run_store(session["registry_dir"] / "runs")
    try:
        with MaskRegistry.embedded(session["registry_dir"]) as reg:
            for label in ("first", "third"):
                run = results[label]
                (derived,) = store.search(Key("parent_uid") == run["uid"]).values()
                assert derived.metadata["start"]["masks"] == run["masks"]
                mask = reg.composite_from_uids(run["mask_uids"]).mask
                # .v3: once databroker.v1 has been used in this process (other
                # tests), the client may hand out the v2 layout by default.
                frames = derived.v3["primary"][EIGER500K].read()
                for i, frame in enumerate(frames):
                    np.testing.assert_array_equal(frame, expected.expected_frame(i) * mask)
    finally:
        store.context.close()


def test_active_set_changes_apply_from_the_next_run(session):
    results, uids = session["results"], session["uids"]
    second = results["second"]["masks"][EIGER500K]
    assert (second["names"], second["chosen_by"]) == (["chip_mask", "hot"], "active set v1")
    assert second["uids"] == [uids["chip_mask"], uids["hot"]]
    third = results["third"]["masks"][EIGER500K]
    assert (third["names"], third["chosen_by"]) == (["beamstop"], "active set v2")
    assert results["third"]["mask_uids"] == [uids["beamstop"]]
    # With the choice withdrawn, the snippet's CHX_MASKS_FALLBACK applies.
    fourth = results["fourth"]["masks"][EIGER500K]
    assert fourth["names"] == results["fallback"] == ["chip_mask"]
    assert fourth["chosen_by"] == "configuration"


# ------------------------------------------------------------ other starts


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_registry_down_at_start_warns_once_and_runs_record_why(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}/api/v1"
    code = SCAN + textwrap.dedent("""
        result = scan(1)
        result["fallback"] = CHX_MASKS_FALLBACK[K]
        print("CHX-RESULT " + json.dumps(result))
    """)
    proc = _launch(tmp_path, code, {"CHX_MASKS_URI": uri, "CHX_MASKS_DIR": str(tmp_path / "local")})
    result = _result(proc)
    output = proc.stdout + proc.stderr
    warnings = [
        line
        for line in output.splitlines()
        if line.startswith("chx-masks: WARNING mask registry unavailable")
    ]
    assert len(warnings) == 1, _explain(proc)
    assert uri in warnings[0] and "record" in warnings[0]
    # The RunEngine works; the run says why it has no masks.
    assert result["exit_status"] == "success" and result["events"] == 1
    record = result["masks"][EIGER500K]
    assert record["error"].startswith("RegistryUnavailableError"), record
    assert uri in record["error"]
    assert record["uids"] == [] and result["mask_uids"] == []
    assert (record["names"], record["chosen_by"]) == (result["fallback"], "configuration")
    # Its masked run is stored, withholds the unmasked frames and says it failed.
    assert result["derived_parent"] == result["uid"]
    assert result["derived_exit"] == "fail"
    assert "Retrying" not in output, _explain(proc)


def _silent_port():
    """A loopback port that accepts connections and never answers (a hung server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("registry", ["never answers", "closed port"])
def test_ipython_starts_in_under_5_s_when_the_registry_is_unreachable(tmp_path, registry):
    """The snippet's share of IPython start, with tiled's own retry settings (45 s)."""
    sock = None
    if registry == "never answers":
        sock, port = _silent_port()
    else:
        port = _free_port()
    uri = f"http://127.0.0.1:{port}/api/v1"
    base = BASE + "import time as _t\n_chx_before = _t.monotonic()\n"
    after = "_chx_after = _t.monotonic()\n"
    code = textwrap.dedent("""
        import json, time
        code_at = time.time()
        started = _chx_after - _chx_before
        began = time.monotonic()
        docs.clear()
        RE(count([det], num=1))
        result = {"snippet_seconds": started, "code_at": code_at,
                  "run_seconds": time.monotonic() - began,
                  "record": docs[0][1]["masks"]["eiger500K_single_image"],
                  "mask_error": docs[0][1].get("mask_error"),
                  "available": chx_masks_provenance.breaker.available}
        print("CHX-RESULT " + json.dumps(result))
    """)
    launched = time.time()
    try:
        proc = _launch(
            tmp_path,
            code,
            {
                "CHX_MASKS_URI": uri,
                "TILED_RETRY_TIMEOUT": "45",
                "CHX_MASKS_DIR": str(tmp_path / "local"),
            },
            base=base,
            after=after,
        )
    finally:
        if sock is not None:
            sock.close()
    result = _result(proc)
    figures = SUMMARY.setdefault("IPython start, registry unreachable", {})
    figures[f"{registry}: the snippet's share of start (s)"] = round(result["snippet_seconds"], 2)
    figures[f"{registry}: launch to prompt (s)"] = round(result["code_at"] - launched, 2)
    figures[f"{registry}: first run, runs store opened too (s)"] = round(result["run_seconds"], 2)
    assert result["snippet_seconds"] < 5, _explain(proc)

    output = proc.stdout + proc.stderr
    assert "Retrying" not in output and "Traceback" not in output, _explain(proc)
    warnings = [line for line in output.splitlines() if line.startswith("chx-masks: WARNING")]
    assert len(warnings) == 1 and uri in warnings[0], _explain(proc)
    assert "did not answer within 2 s" in warnings[0], warnings
    # The run did not wait: it says since when the registry is down, and why
    # it has no masks, in one line.
    assert not result["available"]
    assert "has not answered since" in result["record"]["error"], result
    assert "RegistryUnavailableError" in result["mask_error"]
    run_lines = [
        line
        for line in output.splitlines()
        if line.startswith("chx-masks: A run opens without masks")
    ]
    assert len(run_lines) == 1, _explain(proc)


def test_without_RE_prints_one_line_and_sets_nothing_up(tmp_path):
    code = 'print("CHX-RESULT", __import__("json").dumps(sorted(globals())))'
    proc = _launch(tmp_path, code, {"CHX_MASKS_DIR": str(tmp_path / "registry")}, base="x = 1\n")
    names = _result(proc)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("chx-masks:")]
    assert len(lines) == 1 and "RE" in lines[0] and "after" in lines[0], _explain(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, _explain(proc)
    assert [n for n in names if "mask" in n.lower()] == []
    assert not (tmp_path / "registry").exists()


HELPERS = {
    "chx_masks_registry",
    "chx_masks_runs",
    "masked_run",
    "masks_list",
    "mask_show",
    "mask_register",
    "masks_activate",
    "masks_active",
}


def test_helpers(tmp_path):
    registry_dir = tmp_path / "registry"
    _seed(registry_dir)
    edge = np.ones((514, 1030), dtype=bool)
    edge[:, :3] = False
    np.save(tmp_path / "edge.npy", edge)
    png = tmp_path / "edge.png"
    base = BASE + "_base_names = set(globals())\n"
    code = textwrap.dedent(f"""
        added = sorted(n for n in set(globals()) - _base_names
                       if not n.startswith("_") and n not in ("In", "Out"))
        import importlib.util, json
        import numpy as np
        from bluesky_callbacks import MaskingRouter, MaskProvenance
        K = "eiger500K_single_image"
        checks = {{
            "added": added,
            "documented": sorted(n for n in {sorted(HELPERS)!r} if globals()[n].__doc__),
            "wired": chx_masks_provenance in RE.preprocessors
                     and isinstance(chx_masks_provenance, MaskProvenance)
                     and isinstance(chx_masks_router, MaskingRouter),
        }}
        m = np.ones((514, 1030), bool); m[:, 1000:] = False
        checks["v0"] = mask_register(K, "edge", m, sample="silica")
        checks["v1"] = mask_register(K, "edge", {str(tmp_path / "edge.npy")!r}, update=True)
        masks_activate(K, "edge", note="helpers")
        print("=== list"); masks_list()
        print("=== active"); masks_active()
        print("=== show"); mask_show(K, "edge", png={str(png)!r})
        spec = importlib.util.find_spec("chx_masks._plot")
        checks["can_draw"] = spec is not None and hasattr(
            importlib.import_module("chx_masks._plot"), "mask_png")
        print("CHX-RESULT " + json.dumps(checks))
    """)
    proc = _launch(tmp_path, code, {"CHX_MASKS_DIR": str(registry_dir)}, base=base)
    checks = _result(proc)
    assert checks["added"] == sorted(
        HELPERS
        | {
            "chx_masks_provenance",
            "chx_masks_router",
            "CHX_MASKS_FALLBACK",
            "CHX_MASKS_ON_UNAVAILABLE",
            "CHX_MASKS_TIMEOUT",
            "CHX_MASKS_START_TIMEOUT",
        }
    )
    assert checks["documented"] == sorted(HELPERS)
    assert checks["wired"]

    out = proc.stdout
    listing = out.split("=== list\n")[1].split("=== active\n")[0].splitlines()
    assert listing[0].split() == ["detector", "name", "version", "uid", "masked", "active"]
    rows = {(cells[1], cells[2]): cells for cells in (line.split() for line in listing[1:])}
    assert set(rows) == {("chip_mask", "0"), ("hot", "0"), ("beamstop", "0"), ("edge", "1")}
    assert rows[("edge", "1")][3] == checks["v1"][:8]
    assert rows[("edge", "1")][4] == f"{3 * 514 / (514 * 1030):.3%}"
    assert rows[("edge", "1")][5] == "yes" and len(rows[("hot", "0")]) == 5

    active = out.split("=== active\n")[1].split("=== show\n")[0]
    assert any(line.split()[:3] == [EIGER500K, "edge", "active"] for line in active.splitlines())
    assert "eiger4m_single_image" in active and "CHX_MASKS_FALLBACK" in active
    # The fallback names masks that this registry does not have: flagged, with the fix.
    flags = [line for line in active.splitlines() if line.startswith("! ")]
    assert any(
        line.startswith(
            "! eiger4m_single_image: pixel_mask, chip_mask, bad_pixels "
            "(CHX_MASKS_FALLBACK) are not registered masks"
        )
        for line in flags
    )
    assert any(
        line.startswith(
            "! eiger1m_single_image: chip_mask (CHX_MASKS_FALLBACK) is not a registered mask"
        )
        and "mask_register(" in line
        for line in flags
    ), active
    assert not any(EIGER500K in line for line in flags)  # its active set is fine

    show = out.split("=== show\n")[1]
    assert f"{EIGER500K}/edge v1" in show and checks["v1"] in show
    assert '"sample": "silica"' in show and '"file_name": "edge.npy"' in show
    if checks["can_draw"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"picture        {png}" in show
    else:
        assert "not written" in show and not png.exists()
