"""Two versions of a mask side by side: ``MaskRegistry.diff`` and ``chx-masks diff``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import EIGER500K, SHAPE_500K

from chx_masks import MaskDiff, MaskNotFoundError, MaskRegistry
from chx_masks._cli import main

DET = EIGER500K


def _versions() -> list[np.ndarray]:
    """v0: a beamstop; v1: it, 10 rows down (100 pixels newly masked, 100 kept); v2: v1 + a row."""
    v0 = np.ones(SHAPE_500K, bool)
    v0[100:120, 200:210] = False
    v1 = np.ones(SHAPE_500K, bool)
    v1[110:130, 200:210] = False
    v2 = v1.copy()
    v2[300, :] = False
    return [v0, v1, v2]


def _register(registry: MaskRegistry) -> list[str]:
    v0, v1, v2 = _versions()
    uids = [registry.register_mask(DET, "beamstop", v0)]
    uids += [registry.update_mask(DET, "beamstop", m) for m in (v1, v2)]
    return uids


def test_diff_of_the_last_two_and_of_chosen_versions(registry):
    uids = _register(registry)
    v0, v1, v2 = _versions()

    last = registry.diff(DET, "beamstop")
    assert isinstance(last, MaskDiff)
    assert (last.old.uid, last.new.uid) == (uids[1], uids[2])
    assert (last.newly_masked_pixels, last.newly_kept_pixels) == (1030, 0)
    assert last.masked_in_both_pixels == 200

    moved = registry.diff(DET, "beamstop", 0, 1)
    assert (moved.newly_masked_pixels, moved.newly_kept_pixels) == (100, 100)
    np.testing.assert_array_equal(moved.newly_masked, v0 & ~v1)
    np.testing.assert_array_equal(moved.newly_kept, ~v0 & v1)
    against_latest = registry.diff(DET, "beamstop", 0)
    assert (against_latest.old.version, against_latest.new.version) == (0, 2)
    backwards = registry.diff(DET, "beamstop", 2, 0)
    assert backwards.newly_kept_pixels == against_latest.newly_masked_pixels

    with pytest.raises(MaskNotFoundError, match="no version 7"):
        registry.diff(DET, "beamstop", 0, 7)
    registry.register_mask(DET, "single", v0)
    with pytest.raises(MaskNotFoundError, match="one version only"):
        registry.diff(DET, "single")
    registry.delete_mask(DET, "single")  # a retirement is not a version to compare
    with pytest.raises(MaskNotFoundError, match="one version only"):
        registry.diff(DET, "single")


def test_diff_command(embedded_dir, tmp_path):
    with MaskRegistry.embedded(embedded_dir) as registry:
        uids = _register(registry)
    cli = CliRunner()
    args = ["--dir", str(embedded_dir), "diff", DET, "beamstop"]

    shown = cli.invoke(main, [*args, "0", "1"])
    assert shown.exit_code == 0, shown.output
    assert f"v0 ({uids[0][:8]}) -> v1 ({uids[1][:8]})" in shown.output
    lines = {line.split("  ")[0]: line.split() for line in shown.output.splitlines()}
    assert lines["newly masked"][2] == "100" and lines["newly kept"][2] == "100"

    png = tmp_path / "diff.png"
    as_json = json.loads(cli.invoke(main, [*args, "--png", str(png), "--json"]).output)
    assert (as_json["old"]["uid"], as_json["new"]["uid"]) == (uids[1], uids[2])
    assert (as_json["newly_masked"], as_json["newly_kept"]) == (1030, 0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The picture: the newly masked line in crimson, nothing in blue.
    from matplotlib.image import imread

    pixels = imread(png)[..., :3]
    crimson = np.all(np.abs(pixels - np.array([0xDC, 0x14, 0x3C]) / 255) < 0.02, axis=-1)
    blue = np.all(np.abs(pixels - np.array([0x1F, 0x77, 0xB4]) / 255) < 0.02, axis=-1)
    assert crimson.sum() > 100
    legend_blue = blue.sum()  # only the legend's swatch
    moved_png = tmp_path / "moved.png"
    assert cli.invoke(main, [*args, "0", "1", "--png", str(moved_png)]).exit_code == 0
    moved_blue = np.all(
        np.abs(imread(moved_png)[..., :3] - np.array([0x1F, 0x77, 0xB4]) / 255) < 0.02, axis=-1
    )
    assert moved_blue.sum() > legend_blue

    missing = cli.invoke(main, [*args, "0", "9", "--png", str(tmp_path / "never.png")])
    assert missing.exit_code == 1 and "has no version 9 (it has v0, v1, v2" in missing.output
    assert not (tmp_path / "never.png").exists()
