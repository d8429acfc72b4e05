"""Smoke: both backends register and read back a mask."""

from conftest import EIGER500K, random_mask


def test_round_trip(registry):
    mask = random_mask()
    uid = registry.register_mask(EIGER500K, "m", mask)
    assert (registry.get_mask(EIGER500K, "m").compute() == mask).all()
    assert registry.get_mask_uid(EIGER500K, "m") == uid
