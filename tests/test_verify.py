"""`chx-masks verify`: the scrub of a whole registry, on an embedded registry.

Every interrupted step of a registration is made on purpose with the
registry's own steps (``_store_mask``: node and bytes; ``_claim``: the slot),
and every forgery through the raw tiled client, as the embedded registry has
no access policy (the server tests run the scrub on servers that have one).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from chx_masks import MaskRegistry, mask_sha256
from chx_masks._cli import main
from chx_masks._content import record_sha256
from chx_masks._verify import verify_registry

DET = "eiger500K_single_image"
SHAPE = (514, 1030)


def _mask(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(SHAPE) >= 0.05


def _verify(directory: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, ["--dir", str(directory), "verify", "--json", *args])
    return result.exit_code, json.loads(result.stdout)


def _interrupted(registry: MaskRegistry, name: str, *, claim: bool, seed: int) -> str:
    """A registration stopped after its bytes (claim=False) or after its claim."""
    mask = _mask(seed)
    uid = str(uuid.uuid4())
    md = {
        "uid": uid,
        "detector": DET,
        "name": name,
        "sha256": mask_sha256(mask),
        "shape": list(SHAPE),
        "masked_pixels": int(mask.size - mask.sum()),
        "created_at": "2026-12-01T00:00:00+00:00",
        "chx_masks": 1,
    }
    masks = registry._ensure_container("masks")
    registry._store_mask(masks, uid, mask, md, "an interrupted registration")
    if claim:
        registry._claim(
            registry._ensure_detector_node(registry.get_detector(DET)),
            DET,
            name,
            [],
            kind="mask",
            uid=uid,
            check=lambda _: None,
            record=record_sha256(md),
        )
    return uid


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    registry = MaskRegistry.embedded(tmp_path, disk_cache=False)
    registry.register_mask(DET, "gaps", _mask(1), metadata={"sample": "silica"})
    registry.update_mask(DET, "gaps", _mask(2))
    registry.register_mask(DET, "old", _mask(3))
    registry.activate(DET, ["gaps", "old"])
    registry.delete_mask(DET, "old", force=True)
    registry.close()
    return tmp_path


def test_a_registry_written_through_the_api_is_clean(directory: Path) -> None:
    code, report = _verify(directory)
    assert code == 0 and report["clean"] and report["problems"] == []
    assert report["counts"] == {
        "detectors": 1,
        "lineages": 2,
        "slots": 4,
        "masks": 3,
        "purged": 0,
        "active sets": 2,
    }
    text = CliRunner().invoke(main, ["--dir", str(directory), "verify"])
    assert text.exit_code == 0 and "is clean (1 detectors, 2 lineages" in text.stdout


def test_interrupted_registrations_are_reported_and_repair_fixes_only_them(directory: Path) -> None:
    registry = MaskRegistry.embedded(directory, disk_cache=False)
    orphan = _interrupted(registry, "crashed-before-claim", claim=False, seed=10)
    unsealed = _interrupted(registry, "crashed-before-seal", claim=True, seed=11)
    # A sealed node no slot claims (created by hand): reported, never removed.
    stray = str(uuid.uuid4())
    registry._root["masks"].write_array(
        _mask(12),
        key=stray,
        specs=["chx_mask"],
        metadata={
            "uid": stray,
            "detector": DET,
            "name": "stray",
            "sha256": "0" * 64,
            "shape": list(SHAPE),
            "masked_pixels": 0,
            "created_at": "2026-12-01",
        },
    )
    assert registry.describe(unsealed).version == 0  # served: the version is complete
    registry.close()

    code, report = _verify(directory)
    found = {(p["kind"], p["where"]) for p in report["problems"]}
    assert code == 1 and found == {
        ("orphan", f"masks/{orphan}"),
        ("unsealed", f"masks/{unsealed}"),
        ("sealed orphan", f"masks/{stray}"),
    }

    code, repaired = _verify(directory, "--repair")
    assert code == 1  # the sealed orphan is a person's call
    assert {(p["kind"], p["where"]) for p in repaired["repaired"]} == {
        ("orphan", f"masks/{orphan}"),
        ("unsealed", f"masks/{unsealed}"),
    }
    assert [p["where"] for p in repaired["problems"]] == [f"masks/{stray}"]

    registry = MaskRegistry.embedded(directory, disk_cache=False)
    nodes = set(registry._root["masks"])
    assert orphan not in nodes and stray in nodes and unsealed in nodes
    assert registry._root["masks"][unsealed].metadata["sealed"] is True
    assert registry.describe(unsealed).name == "crashed-before-seal"
    registry.close()


def test_forgeries_are_reported_and_repair_touches_none(directory: Path) -> None:
    import zarr

    registry = MaskRegistry.embedded(directory, disk_cache=False)
    first, second = (r.uid for r in registry.history(DET, "gaps"))
    node = registry._root["masks"][first]
    node.update_metadata(metadata={**node.metadata, "sample": "forged"})
    zarr.open_array(str(directory / "data" / "masks" / second), mode="r+")[0, :] = False
    registry.close()

    report = verify_registry(MaskRegistry.embedded(directory, disk_cache=False), repair=True)
    found = {(p.kind, p.where) for p in report.problems}
    assert ("record", f"masks/{first}") in found
    assert ("revisions", f"masks/{first}") in found  # tiled kept the rewrite's revision
    assert ("bytes", f"masks/{second}") in found
    assert report.repaired == []
    code, _ = _verify(directory)
    assert code == 1


def test_purge_on_the_command_line_logs_first_and_verify_accepts_it(directory: Path) -> None:
    """`chx-masks purge`: full uid and a reason required; logged; the scrub stays clean."""
    registry = MaskRegistry.embedded(directory, disk_cache=False)
    first, current = (r.uid for r in registry.history(DET, "gaps"))
    last = registry.last_change()
    registry.close()
    run = CliRunner().invoke
    short = run(main, ["--dir", str(directory), "purge", first[:8], "--reason", "x", "--yes"])
    assert short.exit_code == 1 and "full uid" in short.output, short.output
    unsaid = run(main, ["--dir", str(directory), "purge", first, "--yes"])
    assert unsaid.exit_code == 2 and "--reason" in unsaid.output
    asked = run(main, ["--dir", str(directory), "purge", first, "--reason", "x"], input="n\n")
    assert asked.exit_code == 1 and "gaps v0" in asked.output
    nul = run(main, ["--dir", str(directory), "purge", first, "--reason", "a\x00b", "--yes"])
    assert nul.exit_code == 1 and "NUL" in nul.output, nul.output
    registry = MaskRegistry.embedded(directory, disk_cache=False)
    assert registry.last_change() == last  # nothing written by the refusals
    registry.close()

    done = run(
        main,
        [
            "--dir",
            str(directory),
            "purge",
            first,
            "--reason",
            "uploaded the wrong file",
            "--yes",
            "--json",
        ],
    )
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["uid"] == first
    code, report = _verify(directory)
    assert code == 0 and report["counts"]["purged"] == 1, report
    shown = run(main, ["--dir", str(directory), "show", "--uid", first])
    assert shown.exit_code == 1 and "uploaded the wrong file" in shown.output, shown.output

    registry = MaskRegistry.embedded(directory, disk_cache=False)
    entry = dict(registry._root["changes"][str(last + 1)].metadata)
    assert (entry["purged"], entry["reason"]) == (first, "uploaded the wrong file")
    assert entry["by"] == registry.identity
    assert [r.version for r in registry.history(DET, "gaps")] == [0, 1]
    assert registry.get_mask_by_uid(current).compute().shape == SHAPE
    registry.close()
