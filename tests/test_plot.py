"""PNG pictures of masks, composites and frames, checked by the colours read back."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import EIGER4M, EIGER500K, SHAPE_4M, SHAPE_500K

from chx_masks import ChxMasksError, CompositeMask, MaskRegistry, MaskValidationError
from chx_masks._plot import (
    COMPONENT_COLORS,
    KEPT_COLOR,
    MASKED_COLOR,
    SEVERAL_COLOR,
    _component_label,
    _composite_title,
    _frame_norm,
    composite_png,
    frame_png,
    mask_png,
    record_title,
)

pytest.importorskip("matplotlib")


def read_rgb(path) -> np.ndarray:
    """The PNG as uint8 RGB, rows top to bottom."""
    from matplotlib.image import imread

    return np.round(imread(path)[..., :3] * 255).astype(np.uint8)


def where(rgb: np.ndarray, color: str) -> np.ndarray:
    want = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    return (rgb == want).all(axis=-1)


def image_area(rgb: np.ndarray) -> np.ndarray:
    """The part of the picture showing the mask, found by the kept colour.

    Text is anti-aliased black on white (neutral greys only) and legends lie
    outside the axes, so this excludes both.
    """
    rows, cols = np.nonzero(where(rgb, KEPT_COLOR))
    assert rows.size, "no kept pixels in the picture"
    return rgb[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def near(hits: np.ndarray, shape, row: float, col: float, radius: int = 3) -> bool:
    """Whether ``hits`` (in picture pixels) has a hit near detector pixel (row, col)."""
    r = round((row + 0.5) / shape[0] * hits.shape[0])
    c = round((col + 0.5) / shape[1] * hits.shape[1])
    window = hits[max(r - radius, 0) : r + radius + 1, max(c - radius, 0) : c + radius + 1]
    return bool(window.any())


@pytest.fixture(scope="module")
def plot_registry(tmp_path_factory):
    """One embedded registry for the module; opening one takes seconds."""
    reg = MaskRegistry.embedded(tmp_path_factory.mktemp("plot-registry"))
    yield reg
    reg.close()


def rect(shape, rows: slice, cols: slice) -> np.ndarray:
    mask = np.ones(shape, bool)
    mask[rows, cols] = False
    return mask


# ------------------------------------------------------------------- mask_png


def test_one_pixel_lines_and_a_hot_pixel_survive_on_4m(tmp_path):
    mask = np.ones(SHAPE_4M, bool)
    mask[1000, :] = False  # chip boundary row
    mask[:, 700] = False  # chip boundary column
    mask[300, 1500] = False  # hot pixel
    path = mask_png(mask, tmp_path / "new" / "dir" / "m.png", title="chips")

    assert path.is_absolute() and path == (tmp_path / "new" / "dir" / "m.png").resolve()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    area = image_area(read_rgb(path))
    # Reduced about 3x, the picture is smaller than the detector...
    assert max(area.shape[:2]) < max(SHAPE_4M) / 2
    masked = where(area, MASKED_COLOR)
    # ...yet the lines run across it and the hot pixel is there.
    assert masked.sum(axis=1).max() >= 0.95 * area.shape[1]
    assert masked.sum(axis=0).max() >= 0.95 * area.shape[0]
    assert near(masked, SHAPE_4M, 1000, 1000) and near(masked, SHAPE_4M, 1500, 700)
    assert near(masked, SHAPE_4M, 300, 1500)
    # Away from the lines and the hot pixel, nothing is drawn masked.
    assert not near(masked, SHAPE_4M, 1500, 1500, radius=20)
    # Thin stays thin: two 1-screen-pixel lines and a dot, not bands.
    assert masked.sum() < 2.5 * (area.shape[0] + area.shape[1])


def test_fully_kept_mask_shows_no_masked_colour_in_the_image(tmp_path):
    rgb = read_rgb(mask_png(np.ones(SHAPE_500K, bool), tmp_path / "all.png", title="t"))
    assert not where(image_area(rgb), MASKED_COLOR).any()
    # The legend still shows the masked colour, outside the image.
    assert where(rgb, MASKED_COLOR).any()


def test_small_mask_is_drawn_unreduced(tmp_path):
    mask = np.ones((20, 30), bool)
    mask[5, 7] = False
    rgb = read_rgb(mask_png(mask, tmp_path / "tiny.png", title="tiny"))
    masked = where(image_area(rgb), MASKED_COLOR)
    assert near(masked, (20, 30), 5, 7, radius=1)
    # One detector pixel is many picture pixels here, in one compact square.
    rows, cols = np.nonzero(masked)
    assert rows.size > 100
    assert rows.max() - rows.min() == cols.max() - cols.min()


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.ones((2, 3, 4), bool), ["3-D", "2x3x4"]),
        (np.ones(5, bool), ["1-D", "shape 5 "]),
        (np.ones((4, 5), np.uint8), ["uint8", "4x5", "astype(bool)"]),
        ([[1, 2], [3]], ["Cannot read the mask"]),
        (np.zeros((4, 5)), ["float64"]),
        (np.ones((0, 5), bool), ["0x5"]),
        ([[True, False]], None),  # nested lists are fine
    ],
)
def test_mask_png_validates_its_input(tmp_path, bad, words):
    out = tmp_path / "sub" / "bad.png"
    if words is None:
        assert mask_png(bad, out, title="ok").exists()
        return
    with pytest.raises(MaskValidationError) as info:
        mask_png(bad, out, title="bad")
    for word in words:
        assert word in str(info.value)
    assert not out.parent.exists()  # nothing written, not even the directory


def test_missing_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ChxMasksError, match=r'pip install "chx-masks\[plot\]"') as info:
        mask_png(np.ones((4, 4), bool), tmp_path / "x" / "m.png", title="t")
    assert not isinstance(info.value, MaskValidationError)
    assert isinstance(info.value.__cause__, ImportError)
    assert not (tmp_path / "x").exists()


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, json, chx_masks._plot; print(json.dumps('matplotlib' in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert json.loads(out.splitlines()[-1]) is False


# --------------------------------------------------------------------- titles


def test_record_title_names_version_uid_and_masked_percentage(plot_registry):
    mask = rect(SHAPE_500K, slice(0, 103), slice(None))  # 103 of 514 rows: 20.04%
    uid0 = plot_registry.register_mask(EIGER500K, "title_mask", mask)
    uid1 = plot_registry.update_mask(EIGER500K, "title_mask", rect(SHAPE_500K, 0, 0))
    title0 = record_title(plot_registry.describe(uid0))
    title1 = record_title(plot_registry.describe(uid1))
    assert title0 == f"{EIGER500K}/title_mask v0  {uid0}  masked 20.04%"
    assert title1 == f"{EIGER500K}/title_mask v1  {uid1}  masked <0.01%"


def test_composite_title_and_legend_labels(plot_registry):
    a = rect(SHAPE_500K, slice(0, 257), slice(None))  # half the detector
    b = rect(SHAPE_500K, slice(None), slice(0, 103))
    plot_registry.register_mask(EIGER500K, "title_a", a)
    plot_registry.register_mask(EIGER500K, "title_b", b)
    plot_registry.update_mask(EIGER500K, "title_b", b, force=True)
    c = plot_registry.resolve_composite(EIGER500K, ["title_a", "title_b"])
    title = _composite_title(c)
    masked = 1 - c.mask.mean()
    assert title.startswith(f"{EIGER500K}: 2 components")
    assert c.sha256[:12] in title and f"masked {masked:.2%}" in title
    assert _component_label("title_b", c.versions[1], int((~b).sum()), b.size) == (
        "title_b v1 (10.00%)"
    )
    assert _component_label("old", None, 0, 10) == "old legacy (0.00%)"


# -------------------------------------------------------------- composite_png


def test_disjoint_components_each_in_their_colour_on_4m(plot_registry, tmp_path):
    a = rect(SHAPE_4M, slice(100, 400), slice(100, 400))
    b = rect(SHAPE_4M, slice(1500, 1800), slice(1500, 1800))
    plot_registry.register_mask(EIGER4M, "disjoint_a", a)
    plot_registry.register_mask(EIGER4M, "disjoint_b", b)
    c = plot_registry.resolve_composite(EIGER4M, ["disjoint_a", "disjoint_b"])
    area = image_area(read_rgb(composite_png(c, tmp_path / "c.png")))

    first, second = where(area, COMPONENT_COLORS[0]), where(area, COMPONENT_COLORS[1])
    assert near(first, SHAPE_4M, 250, 250) and not near(first, SHAPE_4M, 1650, 1650)
    assert near(second, SHAPE_4M, 1650, 1650) and not near(second, SHAPE_4M, 250, 250)
    # Each square is 300x300 detector pixels, about 100x100 in the picture.
    scale = area.shape[0] / SHAPE_4M[0]
    for hits in (first, second):
        assert hits.sum() == pytest.approx((300 * scale) ** 2, rel=0.1)
    assert not where(area, SEVERAL_COLOR).any()


def test_overlap_drawn_in_the_several_colour(plot_registry, tmp_path):
    a = rect(SHAPE_500K, slice(100, 300), slice(100, 300))
    b = rect(SHAPE_500K, slice(200, 400), slice(200, 400))
    plot_registry.register_mask(EIGER500K, "overlap_a", a)
    plot_registry.register_mask(EIGER500K, "overlap_b", b)
    c = plot_registry.resolve_composite(EIGER500K, ["overlap_a", "overlap_b"])
    area = image_area(read_rgb(composite_png(c, tmp_path / "c.png", title="custom")))

    several = where(area, SEVERAL_COLOR)
    assert near(several, SHAPE_500K, 250, 250)
    assert not near(several, SHAPE_500K, 150, 150) and not near(several, SHAPE_500K, 350, 350)
    assert near(where(area, COMPONENT_COLORS[0]), SHAPE_500K, 150, 150)
    assert near(where(area, COMPONENT_COLORS[1]), SHAPE_500K, 350, 350)


def test_a_hot_pixel_shows_beside_a_large_component(tmp_path):
    # The hot pixel sits in a hole of the beamstop: in its reduced block the
    # component masking fewer pixels wins, so it is not hidden.
    stop = rect(SHAPE_4M, slice(900, 1100), slice(900, 1100))
    stop[1000, 1000] = True
    hot = rect(SHAPE_4M, 1000, 1000)
    c = CompositeMask(
        EIGER4M,
        ("beamstop", "hot"),
        ("u1", "u2"),
        (0, 0),
        "0" * 64,
        mask=stop & hot,
        components=(stop, hot),
    )
    area = image_area(read_rgb(composite_png(c, tmp_path / "hot.png")))
    assert near(where(area, COMPONENT_COLORS[1]), SHAPE_4M, 1000, 1000, radius=1)
    assert not where(area, SEVERAL_COLOR).any()


def test_composite_png_validates_components(tmp_path):
    good = np.ones(SHAPE_500K, bool)
    bad = CompositeMask(
        EIGER500K,
        ("a", "b"),
        ("u1", "u2"),
        (0, 0),
        "0" * 64,
        mask=good,
        components=(good, good.astype(np.uint8)),
    )
    with pytest.raises(MaskValidationError, match=r"component 'b'.*uint8"):
        composite_png(bad, tmp_path / "bad.png")
    wrong = CompositeMask(
        EIGER500K, ("a",), ("u1",), (0,), "0" * 64, mask=good, components=(good.T,)
    )
    with pytest.raises(MaskValidationError, match=r"'a' has shape 1030x514.*514x1030"):
        composite_png(wrong, tmp_path / "bad.png")


# ------------------------------------------------------------------ frame_png


@pytest.fixture(scope="module")
def frame_4m() -> np.ndarray:
    rng = np.random.default_rng(7)
    rows, cols = np.indices(SHAPE_4M)
    r = np.hypot(rows - 1100, cols - 1050)
    frame = rng.poisson(20 * np.exp(-r / 200) + 0.05).astype(np.uint32)
    frame[300, 1500] = np.iinfo(np.uint32).max  # a hot pixel
    return frame


def test_frame_shows_the_mask_colour_only_with_a_mask(tmp_path, frame_4m):
    mask = rect(SHAPE_4M, slice(900, 1200), slice(900, 1200))
    mask[:, 700] = False
    raw = read_rgb(frame_png(frame_4m, tmp_path / "raw.png", title="raw"))
    masked = read_rgb(frame_png(frame_4m, tmp_path / "masked.png", mask=mask, title="masked"))

    assert not where(raw, MASKED_COLOR).any()
    crimson = where(masked, MASKED_COLOR)
    # The 300x300 square (about 100x100 in the picture) and a column line;
    # the legend patch alone is a few hundred pixels.
    assert crimson.sum() > 10_000
    # The 1-pixel column runs the image's height, most of the picture's.
    assert crimson.sum(axis=0).max() > 0.7 * masked.shape[0]


def test_frame_of_zeros_and_small_frames(tmp_path):
    zeros = np.zeros((50, 60), np.uint16)
    mask = np.ones(zeros.shape, bool)
    mask[10, 20] = False
    rgb = read_rgb(frame_png(zeros, tmp_path / "z.png", mask=mask, title="zeros"))
    assert where(rgb, MASKED_COLOR).sum() > 25  # one pixel drawn large, plus the legend


def test_frame_scale_ignores_a_few_hot_pixels():
    values = np.concatenate([np.linspace(0, 50, 100_000), [4e9]])
    norm, extend = _frame_norm(values)
    assert norm.vmin == 0 and norm.vmax < 100 and extend == "max"
    norm, extend = _frame_norm(np.zeros(10))
    assert (norm.vmin, norm.vmax, extend) == (0, 1, "neither")


@pytest.mark.parametrize(
    "frame, mask, words",
    [
        (np.ones((3, 4, 5), np.uint32), None, ["3-D", "3x4x5"]),
        (np.ones((4, 5), bool), None, ["dtype bool"]),
        (np.ones((4, 5), np.uint32), np.ones((5, 4), bool), ["5x4", "4x5"]),
        (np.ones((4, 5), np.uint32), np.ones((4, 5), np.int64), ["int64"]),
    ],
)
def test_frame_png_validates_its_input(tmp_path, frame, mask, words):
    with pytest.raises(MaskValidationError) as info:
        frame_png(frame, tmp_path / "f.png", mask=mask, title="bad")
    for word in words:
        assert word in str(info.value)


def test_flagged_eiger_pixels_do_not_set_the_frame_scale(tmp_path):
    """Gaps at the dtype's maximum (as Eiger firmware flags them) are not counts."""
    rng = np.random.default_rng(3)
    frame = rng.poisson(20, SHAPE_500K).astype(np.uint32)
    frame[:, 500:530] = np.iinfo(np.uint32).max  # about 3% of the pixels
    rgb = read_rgb(frame_png(frame, tmp_path / "f.png", title="flags")).astype(float) / 255
    # A patch inside the image, left of the flagged columns.
    h, w = rgb.shape[:2]
    rgb = rgb[h // 3 : h // 2, w // 8 : w // 3]
    # Counts of about 20 sit mid-scale: the picture is not the colormap's
    # darkest colour, as it would be under a top of 4e9.
    from matplotlib import colormaps

    viridis = colormaps["viridis"]
    # Each pixel's position on the colormap, by its nearest colour.
    lut = viridis(np.linspace(0, 1, 256))[:, :3]
    position = np.abs(rgb[..., None, :] - lut).sum(axis=-1).argmin(axis=-1) / 255
    assert np.median(position) > 0.5  # about 0.2 if the flags set the top
