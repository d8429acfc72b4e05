"""From a stored run to its masks, and from a mask to its runs: API and command line.

Real RunEngine runs of a simulated Eiger 500K with ``MaskProvenance`` (the
detector's active set) and ``MaskingRouter``, written by TiledWriter into a
local runs store; the mask registry embedded or on a loopback tiled server.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from bluesky.plans import count
from bluesky_tiled_plugins import TiledWriter
from click.testing import CliRunner
from helpers import EIGER500K, SHAPE_500K, random_mask

from bluesky_callbacks import (
    MaskingRouter,
    MaskProvenance,
    find_run,
    lineage_uids,
    open_run_store,
    run_masks,
    runs_using,
)
from bluesky_callbacks._deadline import stop_probes
from bluesky_callbacks.sim import sim_eiger500k
from chx_masks import MaskNotFoundError, MaskRegistry
from chx_masks._cli import main

DET = EIGER500K


@pytest.fixture(autouse=True)
def _no_background_checks_left():
    yield
    stop_probes(timeout=1.0)


def _beamstop(row: int) -> np.ndarray:
    mask = np.ones(SHAPE_500K, bool)
    mask[row : row + 20, 100:140] = False
    return mask


def _scans(RE, registry: MaskRegistry, store) -> dict[str, object]:
    """Two runs with beamstop v0, one with v1; each also writes its masked run."""
    gaps = registry.register_mask(DET, "gaps", random_mask(seed=3))
    v0 = registry.register_mask(DET, "beamstop", _beamstop(10))
    registry.activate(DET, ["gaps", "beamstop"])
    RE.preprocessors.append(MaskProvenance(registry))
    RE.subscribe(TiledWriter(store))
    RE.subscribe(MaskingRouter(registry, TiledWriter(store)))
    det = sim_eiger500k()
    first = RE(count([det], num=2))[0]
    second = RE(count([det], num=2))[0]
    v1 = registry.update_mask(DET, "beamstop", _beamstop(30))
    third = RE(count([det], num=2))[0]
    return {"gaps": gaps, "v0": v0, "v1": v1, "runs": (first, second, third)}


def test_run_masks_and_runs_using_through_the_api(RE, registry, tmp_path):
    store = open_run_store(tmp_path / "runs")
    made = _scans(RE, registry, store)
    first, second, third = made["runs"]

    found = run_masks(find_run(store, first[:8]), registry)
    masks = found.detectors[DET]
    assert (found.run_uid, found.plan_name, found.error) == (first, "count", None)
    assert masks.names == ("gaps", "beamstop") and masks.versions == (0, 0)
    assert masks.uids == (made["gaps"], made["v0"])
    assert masks.chosen_by.startswith("active set") and masks.verified is True
    assert masks.created_by == tuple(registry.describe(u).created_by for u in masks.uids)
    assert all(masks.created_by)
    assert found.verified
    assert run_masks(find_run(store, third), registry).detectors[DET].uids[1] == made["v1"]
    # A scan id names a run too (each RunEngine here starts from scan 1).
    assert find_run(store, str(found.scan_id)).metadata["start"]["scan_id"] == found.scan_id

    # Mask -> runs: newest first; the masked runs are listed under their raw run.
    v0_uses = runs_using(store, made["v0"])
    assert [u.run_uid for u in v0_uses] == [second, first]
    assert all(u.detectors == (DET,) and u.uids == (made["v0"],) for u in v0_uses)
    assert v0_uses[0].masks == (f"{DET}/beamstop v0",)
    for use in v0_uses:
        (derived,) = use.derived
        assert store[derived].metadata["start"]["parent_uid"] == use.run_uid
    lineage = runs_using(store, lineage_uids(registry, DET, "beamstop"))
    assert [u.run_uid for u in lineage] == [third, second, first]
    assert runs_using(store, lineage_uids(registry, DET, "beamstop", 1))[0].run_uid == third
    assert [u.run_uid for u in runs_using(store, made["gaps"])] == [third, second, first]
    assert runs_using(store, registry.register_mask(DET, "unused", random_mask(seed=9))) == []
    with pytest.raises(MaskNotFoundError, match="no version 5"):
        lineage_uids(registry, DET, "beamstop", 5)
    with pytest.raises(KeyError, match="No run 'fffff'"):
        find_run(store, "fffff")
    store.context.close()


def test_a_composite_that_does_not_match_its_record_is_reported(registry):
    uid = registry.register_mask(DET, "gaps", random_mask(seed=4))
    record = registry.composite_from_uids([uid]).provenance()
    start = {"uid": "r", "time": 0.0, "masks": {DET: {**record, "chosen_by": "configuration"}}}
    assert run_masks(start, registry).detectors[DET].verified is True
    start["masks"][DET]["sha256"] = "0" * 64
    found = run_masks(start, registry)
    assert found.detectors[DET].verified is False and not found.verified
    start["masks"][DET]["uids"] = ["0" * 32]
    assert "MaskNotFoundError" in run_masks(start, registry).detectors[DET].error


def test_run_and_runs_using_through_the_command_line(RE, embedded_dir):
    registry = MaskRegistry.embedded(embedded_dir)
    store = open_run_store(embedded_dir / "runs")  # where the commands look by default
    made = _scans(RE, registry, store)
    first, second, third = made["runs"]
    store.context.close()
    registry.close()
    cli = CliRunner()

    shown = cli.invoke(main, ["--dir", str(embedded_dir), "run", first[:8]])
    assert shown.exit_code == 0, shown.output
    assert first in shown.output and "matches" in shown.output
    assert made["v0"] in shown.output and made["gaps"] in shown.output
    assert "active set" in shown.output
    as_json = json.loads(
        cli.invoke(main, ["--dir", str(embedded_dir), "run", third, "--json"]).output
    )
    assert as_json["detectors"][DET]["uids"] == [made["gaps"], made["v1"]]
    assert as_json["detectors"][DET]["verified"] is True

    listed = cli.invoke(main, ["--dir", str(embedded_dir), "runs-using", DET, "beamstop", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [r["run_uid"] for r in json.loads(listed.output)] == [third, second, first]
    v0 = cli.invoke(
        main, ["--dir", str(embedded_dir), "runs-using", DET, "beamstop", "--version", "0"]
    )
    assert v0.exit_code == 0 and second[:8] in v0.output and third[:8] not in v0.output
    assert "beamstop v0" in v0.output
    by_uid = cli.invoke(main, ["--dir", str(embedded_dir), "runs-using", made["v1"][:8]])
    assert by_uid.exit_code == 0 and third[:8] in by_uid.output and first[:8] not in by_uid.output

    unknown = cli.invoke(main, ["--dir", str(embedded_dir), "run", "fffff"])
    assert unknown.exit_code == 1 and "No run 'fffff'" in unknown.output
    mixed = cli.invoke(
        main, ["--dir", str(embedded_dir), "runs-using", made["v1"], "--version", "1"]
    )
    assert mixed.exit_code == 2 and "--version goes with DET NAME" in mixed.output
    missing = cli.invoke(main, ["--dir", str(embedded_dir / "elsewhere"), "run", first])
    assert missing.exit_code == 1 and "--runs URI|DIR" in missing.output
