"""Every file format and every generator: registered, `describe(uid)` says how it was made."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from helpers import EIGER500K, SHAPE_500K, random_mask

from chx_masks import generate, io

FORMATS = {
    "npy": "m.npy",
    "npz": "m.npz",
    "tiff": "m.tiff",
    "edf": "m.edf",
    "msk": "m.msk",
    "nexus": "m.h5",
    "indices": "m.txt",
}


@pytest.fixture
def embedded(embedded_dir):
    from chx_masks import MaskRegistry

    with MaskRegistry.embedded(embedded_dir) as registry:
        yield registry


def test_every_format_records_its_source(embedded, tmp_path):
    for i, (fmt, file_name) in enumerate(FORMATS.items()):
        mask = random_mask(seed=i)
        # A TIFF is read both ways, so writing one needs the convention said.
        convention = "keep" if fmt == "tiff" else None
        path = io.write_mask(mask, tmp_path / file_name, convention=convention)
        uid = io.register_from_file(embedded, EIGER500K, f"from_{fmt}", path)
        record = embedded.describe(uid)
        source = record.metadata["source"]
        assert source["kind"] == "file" and source["format"] == fmt, source
        assert source["file_name"] == file_name
        assert source["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert source["convention"] in ("keep", "masked-nonzero")
        np.testing.assert_array_equal(embedded.get_mask_by_uid(uid).compute(), mask)


def _generated():
    rng = np.random.default_rng(3)
    darks = rng.poisson(0.05, size=(5, *SHAPE_500K)).astype(np.uint32)
    darks[:, 100, 200] += 40
    flats = rng.poisson(200, size=(5, *SHAPE_500K)).astype(np.uint32)
    flats[:, 300, 400] = 0
    stop = generate.circle(SHAPE_500K, (257, 515), 30)
    return {
        "module_gaps": generate.module_gaps("eiger1m_single_image"),
        "chip_lines": generate.chip_lines(EIGER500K),
        "hot_dead_pixels": generate.hot_dead_pixels(
            darks, flats=flats, hot_threshold=5, dead_threshold=0.1
        ),
        "circle": stop,
        "rectangle": generate.rectangle(SHAPE_500K, (0, 0), (9, 1029)),
        "polygon": generate.polygon(SHAPE_500K, [(10.5, 10.5), (10.5, 60.5), (60.5, 10.5)]),
        "grow": generate.grow(stop, 3),
    }


def test_every_generator_records_its_source(embedded):
    for name, made in _generated().items():
        detector = "eiger1m_single_image" if name == "module_gaps" else EIGER500K
        uid = made.register(embedded, detector, f"gen_{name}")
        source = embedded.describe(uid).metadata["source"]
        assert source["kind"] == "generator" and source["generator"] == name
        assert source["parameters"], name
        np.testing.assert_array_equal(embedded.get_mask_by_uid(uid).compute(), made.mask)
        if name != "hot_dead_pixels":  # its dark/flat stacks are not stored
            np.testing.assert_array_equal(generate.remake(source).mask, made.mask)
    hot = embedded.describe(embedded.get_mask_uid(EIGER500K, "gen_hot_dead_pixels"))
    assert hot.masked_pixels == 2
