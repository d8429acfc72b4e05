"""Mask generators: Eiger geometry against pyFAI, pixel statistics, shapes, growth, remake."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from chx_masks import MaskValidationError, mask_sha256
from chx_masks import generate as gen
from chx_masks.generate import (
    GeneratedMask,
    chip_lines,
    circle,
    grow,
    hot_dead_pixels,
    module_gaps,
    polygon,
    rectangle,
    remake,
)

EIGER4M = "eiger4m_single_image"
EIGER1M = "eiger1m_single_image"
EIGER500K = "eiger500K_single_image"


def masked_lines(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """Rows and columns that are masked over their whole length."""
    bad = ~mask
    return (
        [int(i) for i in np.flatnonzero(bad.all(axis=1))],
        [int(j) for j in np.flatnonzero(bad.all(axis=0))],
    )


def lines_mask(shape, rows, cols) -> np.ndarray:
    """True where a pixel lies on one of ``rows`` or ``cols``."""
    r = np.zeros(shape[0], bool)
    c = np.zeros(shape[1], bool)
    r[list(rows)] = True
    c[list(cols)] = True
    return r[:, None] | c[None, :]


def keys_of(obj) -> list[str]:
    if isinstance(obj, dict):
        return [k for key, value in obj.items() for k in [key, *keys_of(value)]]
    if isinstance(obj, list):
        return [k for value in obj for k in keys_of(value)]
    return []


# --------------------------------------------------------------------------- module gaps

GAP_ROWS_4M = [*range(514, 551), *range(1065, 1102), *range(1616, 1653)]
GAP_COLS_4M = list(range(1030, 1040))


def test_module_gaps_4m_are_the_known_eiger_gaps():
    g = module_gaps(EIGER4M)
    assert g.mask.shape == (2167, 2070) and g.mask.dtype == np.bool_
    assert masked_lines(g.mask) == (GAP_ROWS_4M, GAP_COLS_4M)
    # Nothing but those lines is masked.
    np.testing.assert_array_equal(~g.mask, lines_mask(g.mask.shape, GAP_ROWS_4M, GAP_COLS_4M))
    assert g.masked_pixels == 3 * 37 * 2070 + 10 * (2167 - 3 * 37)
    assert g.source["parameters"] == {"detector": EIGER4M, "pyfai_detector": "Eiger4M"}


def test_module_gaps_1m_and_500k():
    g1 = module_gaps(EIGER1M)
    assert g1.mask.shape == (1065, 1030)
    assert masked_lines(g1.mask) == (list(range(514, 551)), [])
    assert g1.masked_pixels == 37 * 1030
    g5 = module_gaps(EIGER500K)
    assert g5.mask.shape == (514, 1030)
    assert g5.mask.all()


def test_module_geometry_constants_agree_with_pyfai():
    from pyFAI.detectors import Eiger, detector_factory

    assert tuple(Eiger.MODULE_SIZE) == gen.MODULE_SHAPE == (514, 1030)
    assert tuple(Eiger.MODULE_GAP) == gen.MODULE_GAP == (37, 10)
    # 2 x 4 chips of 256 with 2 interpolated pixels at each internal boundary.
    assert gen.MODULE_SHAPE == (2 * 256 + 1 * 2, 4 * 256 + 3 * 2)
    for name in gen.PYFAI_DETECTORS.values():
        assert detector_factory(name).shape is not None


def test_module_gaps_refuses_unknown_detector_listing_known_ones():
    with pytest.raises(MaskValidationError) as info:
        module_gaps("pilatus800k_image")
    message = str(info.value)
    assert "pilatus800k_image" in message
    for known in (EIGER4M, EIGER1M, EIGER500K):
        assert known in message


def test_module_gaps_refuses_pyfai_shape_that_differs(monkeypatch):
    monkeypatch.setitem(gen.PYFAI_DETECTORS, EIGER500K, "Eiger1M")
    with pytest.raises(MaskValidationError, match="1065x1030.*514x1030"):
        module_gaps(EIGER500K)


def test_module_gaps_source_names_libraries():
    import pyFAI

    source = module_gaps(EIGER1M).source
    assert source["kind"] == "generator" and source["generator"] == "module_gaps"
    assert source["libraries"] == {"numpy": np.__version__, "pyFAI": str(pyFAI.version)}
    assert source["chx_masks"] == __import__("chx_masks").__version__


# --------------------------------------------------------------------------- chip lines

CHIP_ROWS_MODULE = [256, 257]
CHIP_COLS_MODULE = [256, 257, 514, 515, 772, 773]


def test_chip_lines_one_module():
    g = chip_lines(EIGER500K)
    assert masked_lines(g.mask) == (CHIP_ROWS_MODULE, CHIP_COLS_MODULE)
    np.testing.assert_array_equal(
        ~g.mask, lines_mask((514, 1030), CHIP_ROWS_MODULE, CHIP_COLS_MODULE)
    )
    # Chip 0 is rows/cols 0-255, the next starts at 258: those stay kept.
    assert g.mask[255, :256].all() and g.mask[258, :256].all()
    assert g.mask[:256, 255].all() and g.mask[:256, 258].all()


def test_chip_lines_width_two():
    g = chip_lines(EIGER500K, width=2)
    rows, cols = masked_lines(g.mask)
    assert rows == [255, 256, 257, 258]
    assert cols == [255, 256, 257, 258, 513, 514, 515, 516, 771, 772, 773, 774]
    assert g.source["parameters"] == {"detector": EIGER500K, "width": 2}


def test_chip_lines_4m_follow_modules_and_leave_gaps_to_module_gaps():
    g = chip_lines(EIGER4M)
    row_pitch, col_pitch = 514 + 37, 1030 + 10
    rows = [m * row_pitch + r for m in range(4) for r in CHIP_ROWS_MODULE]
    cols = [m * col_pitch + c for m in range(2) for c in CHIP_COLS_MODULE]
    assert rows == [256, 257, 807, 808, 1358, 1359, 1909, 1910]
    assert cols == [256, 257, 514, 515, 772, 773, 1296, 1297, 1554, 1555, 1812, 1813]
    # Chip lines lie on module pixels only; pyFAI's gap pixels stay kept.
    on_modules = module_gaps(EIGER4M).mask
    expected = lines_mask((2167, 2070), rows, cols) & on_modules
    np.testing.assert_array_equal(~g.mask, expected)
    assert g.mask[~on_modules].all()


@pytest.mark.parametrize("width", [0, -1, 129, 1.5, True])
def test_chip_lines_refuses_bad_width(width):
    with pytest.raises(MaskValidationError, match="width"):
        chip_lines(EIGER500K, width=width)


def test_chip_lines_refuses_unknown_detector():
    with pytest.raises(MaskValidationError, match="eiger4m_single_image"):
        chip_lines("eiger9m_image")


# --------------------------------------------------------------------------- hot / dead pixels

FRAME = (32, 48)
HOT = [(0, 0), (5, 17), (31, 47), (20, 3)]
DEAD = [(1, 1), (12, 40), (30, 0)]


@pytest.fixture
def stacks():
    rng = np.random.default_rng(20261125)
    darks = rng.poisson(0.1, size=(20, *FRAME)).astype(np.uint32)
    flats = rng.poisson(1000.0, size=(10, *FRAME)).astype(np.uint32)
    for r, c in HOT:
        darks[:, r, c] = rng.poisson(50.0, size=20)
    for r, c in DEAD:
        flats[:, r, c] = rng.poisson(10.0, size=10)
    return darks, flats


def as_set(mask: np.ndarray) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in np.argwhere(~mask)}


def test_hot_pixels_found_exactly(stacks):
    darks, _ = stacks
    g = hot_dead_pixels(darks, hot_threshold=5)
    assert as_set(g.mask) == set(HOT)
    p = g.source["parameters"]
    assert p["hot_pixels"] == len(HOT) and p["dead_pixels"] == 0
    assert p["n_dark_frames"] == 20 and p["n_flat_frames"] == 0
    assert p["hot_threshold"] == 5.0 and p["dead_threshold"] is None


def test_hot_and_dead_pixels_found_exactly(stacks):
    darks, flats = stacks
    g = hot_dead_pixels(darks, flats=flats, hot_threshold=5, dead_threshold=0.2)
    assert as_set(g.mask) == set(HOT) | set(DEAD)
    p = g.source["parameters"]
    assert (p["hot_pixels"], p["dead_pixels"], p["masked_pixels"]) == (4, 3, 7)
    assert p["n_flat_frames"] == 10 and p["dead_threshold"] == 0.2
    assert p["frame_shape"] == list(FRAME)
    json.dumps(g.source, allow_nan=False)


def test_hot_dead_records_a_fingerprint_of_the_stacks(stacks):
    darks, flats = stacks
    p = hot_dead_pixels(darks, flats=flats, hot_threshold=5, dead_threshold=0.2).source[
        "parameters"
    ]
    assert len(p["darks_sha256"]) == 64 and p["darks_sha256"] != p["flats_sha256"]
    assert p["darks_sha256"] == gen._array_sha256(darks)
    changed = darks.copy()
    changed[3, 10, 10] += 1
    assert (
        hot_dead_pixels(changed, hot_threshold=5).source["parameters"]["darks_sha256"]
        != (p["darks_sha256"])
    )
    # Same counts, other dtype: another fingerprint (the bytes differ).
    assert gen._array_sha256(darks.astype(np.uint16)) != p["darks_sha256"]
    assert p["darks_sha256"] != hashlib.sha256(b"").hexdigest()


def test_hot_dead_refuses_masking_nothing_unless_allowed(stacks):
    darks, _ = stacks
    with pytest.raises(MaskValidationError, match="no pixel.*allow_extreme"):
        hot_dead_pixels(darks, hot_threshold=1000)
    g = hot_dead_pixels(darks, hot_threshold=1000, allow_extreme=True)
    assert g.mask.all() and g.source["parameters"]["allow_extreme"] is True


def test_hot_dead_refuses_masking_everything_unless_allowed(stacks):
    darks, flats = stacks
    with pytest.raises(MaskValidationError, match="every pixel"):
        hot_dead_pixels(darks + 1, hot_threshold=0)
    with pytest.raises(MaskValidationError, match="every pixel"):
        hot_dead_pixels(darks, flats=flats, hot_threshold=5, dead_threshold=100)
    g = hot_dead_pixels(darks + 1, hot_threshold=0, allow_extreme=True)
    assert not g.mask.any()


@pytest.mark.parametrize(
    ("darks_shape", "flats_shape", "kwargs", "match"),
    [
        ((32, 48), None, {"hot_threshold": 5}, "3-D"),
        ((2, 2, 32, 48), None, {"hot_threshold": 5}, "3-D"),
        ((3, 32, 48), (3, 48, 32), {"hot_threshold": 5, "dead_threshold": 0.2}, "48x32"),
        ((3, 32, 48), (3, 32, 48), {"hot_threshold": 5}, "together"),
        ((3, 32, 48), None, {"hot_threshold": 5, "dead_threshold": 0.2}, "together"),
        ((3, 32, 48), None, {"hot_threshold": -1}, "hot_threshold"),
        ((3, 32, 48), None, {"hot_threshold": float("nan")}, "hot_threshold"),
        ((3, 32, 48), (3, 32, 48), {"hot_threshold": 5, "dead_threshold": -0.1}, "dead"),
    ],
)
def test_hot_dead_refuses_bad_input(darks_shape, flats_shape, kwargs, match):
    darks = np.ones(darks_shape, dtype=np.uint32)
    flats = None if flats_shape is None else np.full(flats_shape, 100, dtype=np.uint32)
    with pytest.raises(MaskValidationError, match=match):
        hot_dead_pixels(darks, flats=flats, **kwargs)


def test_hot_dead_cannot_be_remade_and_says_why(stacks):
    darks, _ = stacks
    g = hot_dead_pixels(darks, hot_threshold=5)
    with pytest.raises(MaskValidationError, match="cannot be re-made.*hot_dead_pixels"):
        remake(g.source)


# --------------------------------------------------------------------------- grow


def single(shape, r, c) -> np.ndarray:
    m = np.ones(shape, dtype=bool)
    m[r, c] = False
    return m


@pytest.mark.parametrize(("pixels", "side"), [(1, 3), (2, 5), (3, 7)])
def test_grow_single_pixel_in_the_middle_is_a_square(pixels, side):
    g = grow(single((11, 11), 5, 5), pixels)
    expected = np.zeros((11, 11), bool)
    expected[5 - pixels : 5 + pixels + 1, 5 - pixels : 5 + pixels + 1] = True
    np.testing.assert_array_equal(~g.mask, expected)
    assert g.masked_pixels == side * side


@pytest.mark.parametrize(
    ("r", "c", "block"),
    [
        (0, 0, (slice(0, 2), slice(0, 2))),
        (0, 8, (slice(0, 2), slice(7, 9))),
        (6, 0, (slice(5, 7), slice(0, 2))),
        (6, 8, (slice(5, 7), slice(7, 9))),
        (0, 4, (slice(0, 2), slice(3, 6))),
        (3, 8, (slice(2, 5), slice(7, 9))),
    ],
)
def test_grow_at_corners_and_edges_does_not_wrap(r, c, block):
    g = grow(single((7, 9), r, c), 1)
    expected = np.zeros((7, 9), bool)
    expected[block] = True
    np.testing.assert_array_equal(~g.mask, expected)


def test_grow_zero_is_identity_and_a_fresh_array():
    m = single((6, 6), 2, 3)
    m[0, :] = False
    g = grow(m, 0)
    np.testing.assert_array_equal(g.mask, m)
    assert not np.shares_memory(g.mask, m)
    m[4, 4] = False  # the caller's array stays theirs
    assert g.mask[4, 4]


def test_grow_past_the_image_masks_everything():
    assert not grow(single((4, 5), 1, 1), 10).mask.any()


def test_grow_matches_scipy_dilation_with_a_square():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(3)
    m = rng.random((40, 50)) > 0.02
    for pixels in (1, 2, 4):
        expected = ndimage.binary_dilation(~m, structure=np.ones((3, 3), bool), iterations=pixels)
        np.testing.assert_array_equal(~grow(m, pixels).mask, expected)


def test_grow_records_its_input():
    m = single((6, 6), 2, 3)
    p = grow(m, 2).source["parameters"]
    assert p == {"pixels": 2, "input_sha256": mask_sha256(m)}
    inner = circle((9, 9), (4, 4), 1)
    g = grow(inner, 1)
    assert g.source["parameters"]["input"] == inner.source
    np.testing.assert_array_equal(remake(g.source).mask, g.mask)


def test_grow_of_a_plain_array_cannot_be_remade():
    g = grow(single((6, 6), 2, 3), 1)
    with pytest.raises(MaskValidationError, match="plain array"):
        remake(g.source)


@pytest.mark.parametrize(
    ("mask", "pixels", "match"),
    [
        (np.ones((4, 4), dtype=np.uint8), 1, "bool"),
        (np.ones((2, 4, 4), dtype=bool), 1, "2-D"),
        (np.ones((4, 4), dtype=bool), -1, "pixels"),
        (np.ones((4, 4), dtype=bool), 1.0, "pixels"),
    ],
)
def test_grow_refuses_bad_input(mask, pixels, match):
    with pytest.raises(MaskValidationError, match=match):
        grow(mask, pixels)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("center", "radius", "count"),
    [((5, 5), 1, 5), ((5, 5), 1.5, 9), ((5, 5), 2, 13), ((5, 5), 0.5, 1), ((0, 0), 1, 3)],
)
def test_circle_pixel_counts(center, radius, count):
    g = circle((11, 11), center, radius)
    assert g.masked_pixels == count
    assert not g.mask[center]
    assert g.source["parameters"] == {
        "shape": [11, 11],
        "center": [float(center[0]), float(center[1])],
        "radius": float(radius),
    }


def test_circle_is_row_col():
    g = circle((5, 9), center=(1, 7), radius=0.5)
    assert as_set(g.mask) == {(1, 7)}


@pytest.mark.parametrize(
    ("shape", "center", "radius", "match"),
    [
        ((5, 5), (2, 2), 0, "radius"),
        ((5, 5), (2, 2), -1, "radius"),
        ((5, 5), (2, 2), float("nan"), "radius"),
        ((5, 5), (2, 2), "3", "radius"),
        ((0, 5), (2, 2), 1, "shape"),
        ((5,), (2, 2), 1, "shape"),
        ((5.0, 5), (2, 2), 1, "shape"),
        ((5, 5, 5), (2, 2), 1, "shape"),
        ((5, 5), (2,), 1, "center"),
        ((5, 5), (2, float("inf")), 1, "center"),
        ((5, 5), (20, 20), 1, "covers no pixel"),
    ],
)
def test_circle_refuses_bad_arguments(shape, center, radius, match):
    with pytest.raises(MaskValidationError, match=match):
        circle(shape, center, radius)


def test_rectangle_includes_both_corners():
    g = rectangle((6, 7), (1, 2), (3, 5))
    expected = np.zeros((6, 7), bool)
    expected[1:4, 2:6] = True
    np.testing.assert_array_equal(~g.mask, expected)
    assert g.masked_pixels == 12
    assert rectangle((6, 7), (2, 2), (2, 2)).masked_pixels == 1


def test_rectangle_is_clipped_without_wrapping():
    assert as_set(rectangle((5, 5), (-2, -2), (0, 0)).mask) == {(0, 0)}
    assert rectangle((5, 5), (3, 3), (10, 10)).masked_pixels == 4


@pytest.mark.parametrize(
    ("top_left", "bottom_right", "match"),
    [
        ((3, 1), (1, 3), "above or left"),
        ((1, 3), (3, 1), "above or left"),
        ((1.5, 1), (3, 3), "top_left"),
        ((1, 1), (3,), "bottom_right"),
        ((6, 6), (8, 8), "covers no pixel"),
    ],
)
def test_rectangle_refuses_bad_arguments(top_left, bottom_right, match):
    with pytest.raises(MaskValidationError, match=match):
        rectangle((5, 5), top_left, bottom_right)


def test_polygon_square_and_l_shape_counts():
    square = polygon((8, 8), [(1.5, 1.5), (1.5, 4.5), (4.5, 4.5), (4.5, 1.5)])
    expected = np.zeros((8, 8), bool)
    expected[2:5, 2:5] = True
    np.testing.assert_array_equal(~square.mask, expected)
    # Concave: a 4x4 block minus its 2x2 top-right corner.
    ell = polygon((8, 8), [(0.5, 0.5), (0.5, 2.5), (2.5, 2.5), (2.5, 4.5), (4.5, 4.5), (4.5, 0.5)])
    assert ell.masked_pixels == 16 - 4
    assert ell.mask[1, 3] and ell.mask[2, 4] and not ell.mask[1, 1] and not ell.mask[4, 4]


def test_polygon_triangle_matches_matplotlib_off_the_edges():
    path_module = pytest.importorskip("matplotlib.path")
    vertices = [(2.3, 1.7), (27.6, 9.2), (11.1, 33.4)]
    g = polygon((30, 40), vertices)
    rr, cc = np.mgrid[0:30, 0:40]
    centres = np.column_stack([rr.ravel(), cc.ravel()])
    expected = path_module.Path(vertices).contains_points(centres).reshape(30, 40)
    np.testing.assert_array_equal(~g.mask, expected)
    assert 100 < g.masked_pixels < 400


def test_polygon_vertices_in_either_order_give_the_same_mask():
    v = [(1.5, 1.5), (1.5, 6.5), (6.5, 3.5)]
    np.testing.assert_array_equal(polygon((9, 9), v).mask, polygon((9, 9), v[::-1]).mask)


@pytest.mark.parametrize(
    ("vertices", "match"),
    [
        ([(1, 1), (3, 3)], "at least 3"),
        ([], "at least 3"),
        ([(1, 1), (3, 3), ("a", 2)], "vertex"),
        ([(1, 1, 1), (3, 3), (2, 2)], "vertex"),
        (5, "vertices"),
        ([(20.5, 20.5), (20.5, 30.5), (30.5, 30.5)], "covers no pixel"),
    ],
)
def test_polygon_refuses_bad_vertices(vertices, match):
    with pytest.raises(MaskValidationError, match=match):
        polygon((8, 8), vertices)


# --------------------------------------------------------------------------- the value object


def test_generated_mask_is_frozen_and_read_only():
    g = circle((5, 5), (2, 2), 1)
    with pytest.raises(ValueError):
        g.mask[0, 0] = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.mask = np.ones((5, 5), bool)
    assert "circle" in repr(g) and "masked_pixels=5" in repr(g)
    assert g.sha256 == mask_sha256(g.mask)


@pytest.mark.parametrize(
    "make",
    [
        lambda: module_gaps(EIGER1M),
        lambda: chip_lines(EIGER500K, width=3),
        lambda: circle((9, 9), (4, 4), 2),
        lambda: rectangle((9, 9), (1, 1), (2, 3)),
        lambda: polygon((9, 9), [(1.5, 1.5), (1.5, 6.5), (6.5, 3.5)]),
        lambda: grow(circle((9, 9), (4, 4), 1), 2),
    ],
)
def test_every_source_is_json_without_dots_in_keys_and_remakes(make):
    g = make()
    assert isinstance(g, GeneratedMask)
    text = json.dumps(g.source, allow_nan=False)
    assert not [k for k in keys_of(json.loads(text)) if "." in k]
    assert set(g.source) == {"kind", "generator", "parameters", "libraries", "chx_masks"}
    again = remake(json.loads(text))
    np.testing.assert_array_equal(again.mask, g.mask)
    assert again.source == g.source


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ({"kind": "upload"}, "kind 'generator'"),
        ("circle", "kind 'generator'"),
        ({"kind": "generator", "generator": "ellipse", "parameters": {}}, "ellipse"),
        ({"kind": "generator", "generator": "circle", "parameters": []}, "parameters"),
        (
            {"kind": "generator", "generator": "circle", "parameters": {"shape": [5, 5]}},
            "do not fit",
        ),
    ],
)
def test_remake_refuses_bad_sources(source, match):
    with pytest.raises(MaskValidationError, match=match):
        remake(source)


# --------------------------------------------------------------------------- registry


def test_register_stores_source_and_remakes(registry):
    made = {
        "gaps": module_gaps(EIGER1M),
        "beamstop": circle((1065, 1030), (530, 515), 40),
        "beamstop_grown": grow(circle((1065, 1030), (530, 515), 40), 3),
    }
    for name, g in made.items():
        uid = g.register(registry, EIGER1M, name, metadata={"operator": "chx"})
        record = registry.describe(uid)
        assert record.metadata["operator"] == "chx"
        source = record.metadata["source"]
        assert source["generator"] == g.source["generator"]
        assert source["parameters"] == g.source["parameters"]
        stored = np.asarray(registry.get_mask_by_uid(uid).compute())
        np.testing.assert_array_equal(stored, g.mask)
        np.testing.assert_array_equal(remake(source).mask, stored)
        assert record.sha256 == g.sha256


def test_register_update_and_reserved_source_key(registry):
    first = circle((514, 1030), (250, 500), 10)
    second = circle((514, 1030), (250, 500), 20)
    first.register(registry, EIGER500K, "beamstop")
    uid = second.register(registry, EIGER500K, "beamstop", update=True)
    record = registry.describe(uid)
    assert record.version == 1
    assert record.metadata["source"]["parameters"]["radius"] == 20.0
    with pytest.raises(MaskValidationError, match="source"):
        first.register(registry, EIGER500K, "other", metadata={"source": "me"})
    assert registry.get_masks(EIGER500K) == [(EIGER500K, "beamstop")]


def test_importing_generate_does_not_import_pyfai():
    import subprocess
    import sys

    code = "import sys, chx_masks.generate; print('pyFAI' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"
