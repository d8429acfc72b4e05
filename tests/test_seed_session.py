"""The seed session of the original CHX README, typed as a user types it.

It runs against the default registry twice: embedded (no configuration) and a
real tiled server on loopback chosen through CHX_MASKS_URI/CHX_MASKS_API_KEY.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import dask.array
import numpy as np
import pytest
from helpers import SHAPE_4M, server_node_uri

import chx_masks


def _seed_masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2022)
    chip = np.ones(SHAPE_4M, dtype=bool)
    chip[0, :] = chip[-1, :] = chip[:, 0] = chip[:, -1] = False
    pixel = rng.random(SHAPE_4M) > 0.001
    bad = np.ones(SHAPE_4M, dtype=bool)
    bad[1000:1010, 300:305] = False
    saxs = np.ones(SHAPE_4M, dtype=bool)
    saxs[1100:1200, 1000:1100] = False
    return {"pixel_mask": pixel, "chip_mask": chip, "bad_pixels": bad, "jul11_2022_4m_saxs": saxs}


def run_seed_session() -> None:
    from chx_masks import (
        delete_mask,
        get_composite_mask,
        get_mask,
        get_mask_uid,
        get_masks,
        register_mask,
    )

    masks = _seed_masks()
    uids = {}
    for name, mask in masks.items():
        uids[name] = register_mask("eiger4m_single_image", name, mask)
        assert str(uuid.UUID(uids[name])) == uids[name]

    assert get_masks() == [("eiger4m_single_image", name) for name in masks]

    lazy = get_mask("eiger4m_single_image", "chip_mask")
    assert isinstance(lazy, dask.array.Array)
    mask = lazy.compute()
    assert isinstance(mask, np.ndarray) and mask.dtype == np.bool_
    assert mask.shape == (2167, 2070)
    np.testing.assert_array_equal(mask, masks["chip_mask"])

    mask_names = ["pixel_mask", "chip_mask", "bad_pixels", "jul11_2022_4m_saxs"]
    composite = get_composite_mask("eiger4m_single_image", mask_names)
    assert isinstance(composite, dask.array.Array)
    assert composite.shape == (2167, 2070) and composite.dtype == np.bool_
    assert composite.chunksize == (2167, 2070)
    expected = np.logical_and.reduce([masks[n] for n in mask_names])
    np.testing.assert_array_equal(composite.compute(), expected)
    # False wins: a pixel masked by any one component is masked in the AND.
    assert not composite.compute()[1000, 300] and not composite.compute()[0, 500]

    uid = get_mask_uid("eiger4m_single_image", "chip_mask")
    assert uid == uids["chip_mask"]

    delete_mask("eiger4m_single_image", "chip_mask")
    assert ("eiger4m_single_image", "chip_mask") not in get_masks()
    with pytest.raises(chx_masks.MaskNotFoundError):
        get_mask("eiger4m_single_image", "chip_mask")
    registry = chx_masks.default_registry()
    np.testing.assert_array_equal(registry.get_mask_by_uid(uid).compute(), masks["chip_mask"])


def test_seed_session_embedded_default(tmp_path, monkeypatch):
    monkeypatch.setenv("CHX_MASKS_DIR", str(tmp_path / "embedded"))
    run_seed_session()
    registry = chx_masks.default_registry()
    assert registry.location == str(tmp_path / "embedded")
    assert (tmp_path / "embedded" / "catalog.db").exists()


def test_seed_session_server(tiled_server, server_registry_uri, monkeypatch):
    monkeypatch.setenv("CHX_MASKS_URI", server_registry_uri)
    monkeypatch.setenv("CHX_MASKS_API_KEY", tiled_server.api_key)
    run_seed_session()
    registry = chx_masks.default_registry()
    assert registry.location == server_registry_uri
    # Nothing went to the embedded default.
    assert not (tmp_dir := chx_masks._embedded.default_directory()).exists(), tmp_dir


def test_explicit_argument_beats_environment(tiled_server, embedded_dir, monkeypatch):
    monkeypatch.setenv("CHX_MASKS_URI", server_node_uri(tiled_server, "does-not-matter"))
    chx_masks.set_default_registry(embedded_dir)
    assert chx_masks.default_registry().location == str(embedded_dir)


def test_uri_beats_embedded_and_profile(tiled_server, server_registry_uri, monkeypatch):
    monkeypatch.setenv("CHX_MASKS_URI", server_registry_uri)
    monkeypatch.setenv("CHX_MASKS_API_KEY", tiled_server.api_key)
    monkeypatch.setenv("CHX_MASKS_PROFILE", "no-such-profile")
    assert chx_masks.default_registry().location == server_registry_uri


def test_profile_is_used(tiled_server, server_registry_uri, monkeypatch):
    from tiled.profiles import load_profiles

    profiles = Path(os.environ["TILED_PROFILES"])  # set for the whole run
    profiles.mkdir(parents=True, exist_ok=True)
    profile = profiles / "chx.yml"
    profile.write_text(f"chx:\n  uri: {server_registry_uri}\n")
    load_profiles.cache_clear()
    # tiled profiles hold no secrets; the key comes from tiled's own variable.
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    monkeypatch.setenv("CHX_MASKS_PROFILE", "chx")
    try:
        registry = chx_masks.default_registry()
        assert registry.location == "profile 'chx'"
        uid = chx_masks.register_mask("eiger500K_single_image", "m", np.ones((514, 1030), bool))
        direct = chx_masks.MaskRegistry.from_uri(server_registry_uri, api_key=tiled_server.api_key)
        assert direct.get_mask_uid("eiger500K_single_image", "m") == uid
        direct.close()
    finally:
        profile.unlink()
        load_profiles.cache_clear()


def test_unknown_profile_says_how_to_list(monkeypatch):
    monkeypatch.setenv("CHX_MASKS_PROFILE", "no-such-profile")
    with pytest.raises(chx_masks.RegistryUnavailableError, match="tiled profile list"):
        chx_masks.default_registry()


def test_embedded_default_in_user_data_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("CHX_MASKS_DIR")
    location = chx_masks._embedded.default_directory()
    assert str(location).startswith(str(tmp_path / "xdg-data"))
    assert chx_masks.default_registry().location == str(location)
