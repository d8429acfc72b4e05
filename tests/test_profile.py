"""bluesky_callbacks.profile in-process: the wiring and helpers the profile snippet installs."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from tiled.queries import Key

from bluesky_callbacks.profile import HELPERS, ProfileMasks, install
from chx_masks import MaskRegistry

K = "eiger500K_single_image"


@pytest.fixture
def registry(tmp_path):
    reg = MaskRegistry.embedded(tmp_path / "registry")
    yield reg
    reg.close()


def _scan(RE, num=2):
    from bluesky.plans import count

    from bluesky_callbacks.sim import sim_eiger500k

    (uid,) = RE(count([sim_eiger500k()], num=num))
    return uid


def test_installing_again_replaces_the_wiring(RE, registry, tmp_path):
    edge = np.ones((514, 1030), bool)
    edge[:, :3] = False
    uid = registry.register_mask(K, "edge", edge)
    first = install(RE, fallback={K: ["edge"]}, registry=registry, runs=tmp_path / "runs")
    second = install(
        RE, fallback={K: ["edge"]}, registry=registry, runs=tmp_path / "runs", previous=first
    )
    assert RE.preprocessors == [second.provenance]
    raw_uid = _scan(RE)
    # One router subscribed: one masked run, recording the mask the fallback named.
    found = second.chx_masks_runs().search(Key("parent_uid") == raw_uid)
    assert len(found) == 1
    masked = second.masked_run(raw_uid)
    assert masked.metadata["start"]["masks"][K]["uids"] == [uid]
    frames = masked["primary"][K].read()
    assert frames.shape[0] == 2 and (frames[:, ~edge] == 0).all()
    second.uninstall()
    assert RE.preprocessors == []


def test_helpers_print_what_the_next_run_uses(RE, registry, tmp_path, capsys):
    masks = install(
        RE,
        fallback={"eiger1m_single_image": ["chip_mask"]},
        registry=registry,
        runs=tmp_path / "runs",
        quiet=True,
    )
    helpers = masks.helpers()
    assert set(helpers) == {*HELPERS, "chx_masks_provenance", "chx_masks_router"}
    assert all(helpers[name].__doc__ for name in HELPERS)

    uid = helpers["mask_register"](K, "edge", np.ones((514, 1030), bool), sample="silica")
    helpers["masks_activate"](K, "edge", note="unit")
    capsys.readouterr()
    helpers["masks_list"]()
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == ["detector", "name", "version", "uid", "masked", "active"]
    assert listing[1].split() == [K, "edge", "0", uid[:8], "0.000%", "yes"]

    helpers["masks_active"]()
    out = capsys.readouterr().out
    assert any(line.split()[:3] == [K, "edge", "active"] for line in out.splitlines())
    assert "! eiger1m_single_image: chip_mask (CHX_MASKS_FALLBACK) is not a registered mask" in out

    helpers["masks_activate"](K, [])
    assert f"{K} has no active set" in capsys.readouterr().out
    masks.uninstall()


def test_an_unreachable_server_costs_start_the_start_timeout_and_one_line(
    RE, monkeypatch, tmp_path, capsys
):
    # A port that accepts and never answers: the worst case for a client.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    monkeypatch.setenv("CHX_MASKS_URI", f"http://127.0.0.1:{port}/api/v1/metadata/masks")
    try:
        started = time.monotonic()
        masks = install(RE, fallback={}, start_timeout=1.0, timeout=1.0, runs=tmp_path / "runs")
        took = time.monotonic() - started
    finally:
        listener.close()
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "WARNING mask registry unavailable" in line]
    assert len(warnings) == 1, err
    assert f"127.0.0.1:{port}" in warnings[0] and "runs open at once" in warnings[0]
    assert took < 30  # bounded by the start timeout, not tiled's retries (generous: shared CI)
    assert isinstance(masks, ProfileMasks) and masks.provenance in RE.preprocessors
    masks.uninstall()
