"""PNG pictures of masks, composites and detector frames, drawn with matplotlib.

Used by the ``chx-masks`` CLI's ``--png`` options and by the demo; needs the
``plot`` extra (``pip install "chx-masks[plot]"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._content import shape_str
from ._errors import ChxMasksError, FrameShapeError, MaskValidationError
from ._records import CompositeMask, MaskRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colorbar import Colorbar
    from matplotlib.colors import SymLogNorm
    from matplotlib.figure import Figure

__all__ = ["composite_png", "frame_png", "mask_png", "record_title"]

# Kept pixels are a light grey with a faint blue tint: anti-aliased black text
# on white only ever yields neutral greys, so this exact colour marks the
# image area unambiguously (the tests locate the image by it).
KEPT_COLOR = "#ebebf0"
MASKED_COLOR = "#dc143c"  # crimson
# Pixels masked by two or more components of a composite.
SEVERAL_COLOR = "#000000"
# tab10 without its grey, which is too close to the kept colour.
COMPONENT_COLORS = (
    "#1f77b4",  # blue
    "#ff7f0e",  # orange
    "#2ca02c",  # green
    "#d62728",  # red
    "#9467bd",  # purple
    "#8c564b",  # brown
    "#e377c2",  # pink
    "#bcbd22",  # olive
    "#17becf",  # cyan
)
FRAME_CMAP = "viridis"  # has no red, so MASKED_COLOR stays distinct on frames
NAN_COLOR = "#808080"
# Top of a frame's colour scale: blocks above it (hot pixels) get the top colour.
_VMAX_QUANTILE = 0.9999

_DPI = 100
# Long side of the image area, in figure pixels, before layout trims it.
_IMAGE_PX = 760
_MIN_IMAGE_PX = 320  # a thin detector still gets a readable height
_MARGIN_W_IN = 3.4  # axis labels, legend or colorbar
_MARGIN_H_IN = 1.3  # title and x label
_MIN_FIG_W_IN = 7.0  # room for a title with a full uid


def _matplotlib() -> tuple[type, type]:
    """Import matplotlib only when a picture is drawn; importing chx_masks stays light."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ChxMasksError(
            f"Drawing PNG pictures needs matplotlib, which cannot be imported ({err}). "
            'Install it with: pip install "chx-masks[plot]"'
        ) from err
    return Figure, FigureCanvasAgg


def _percent(count: int, total: int) -> str:
    """``count`` of ``total`` as a percentage that never shows a nonzero count as 0.00%."""
    if count == 0 or total == 0:
        return "0.00%"
    pct = 100.0 * count / total
    return "<0.01%" if pct < 0.005 else f"{pct:.2f}%"


def _as_array(value: Any, what: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise MaskValidationError(
            f"Cannot read the {what} ({type(value).__name__}) as an array: {err}."
        ) from err


def _describe(arr: np.ndarray) -> str:
    shape = shape_str(arr.shape) if arr.ndim else "()"
    return f"got {arr.ndim}-D shape {shape} of dtype {arr.dtype}"


def _check_mask(mask: Any, what: str = "mask") -> np.ndarray:
    arr = _as_array(mask, what)
    if arr.dtype != np.bool_:
        raise MaskValidationError(
            f"The {what} to draw must be a 2-D array of bool (True = pixel kept); "
            f"{_describe(arr)}. Convert it with `mask.astype(bool)` after checking "
            "that 1 means kept."
        )
    if arr.ndim != 2 or arr.size == 0:
        raise MaskValidationError(
            f"The {what} to draw must be a non-empty 2-D array of bool; "
            f"{_describe(arr)}. Take one image of a stack with `mask[0]`."
        )
    return arr


def _check_frame(frame: Any) -> np.ndarray:
    arr = _as_array(frame, "frame")
    if arr.ndim != 2 or arr.dtype.kind not in "uif" or arr.size == 0:
        raise MaskValidationError(
            f"The frame to draw must be a non-empty 2-D array of counts (integer or "
            f"float); {_describe(arr)}. Take one image of a stack with `frame[0]`."
        )
    return arr


def _pad(arr: np.ndarray, factor: int, fill: Any) -> np.ndarray:
    rows, cols = arr.shape
    pad_r, pad_c = -rows % factor, -cols % factor
    if pad_r or pad_c:
        arr = np.pad(arr, ((0, pad_r), (0, pad_c)), constant_values=fill)
    return arr


def _blocks(arr: np.ndarray, factor: int) -> np.ndarray:
    """View of a padded array as (rows, factor, cols, factor) blocks."""
    rows, cols = arr.shape
    return arr.reshape(rows // factor, factor, cols // factor, factor)


def _block_kept(keep: np.ndarray, factor: int) -> np.ndarray:
    """A block is kept only if every pixel in it is: one masked pixel masks the block."""
    if factor == 1:
        return keep
    return np.asarray(_blocks(_pad(keep, factor, True), factor).all(axis=(1, 3)))


def _block_max(codes: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return codes
    return _blocks(_pad(codes, factor, 0), factor).max(axis=(1, 3))


def _block_mean(frame: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each block over the pixels that exist (edge blocks are partial)."""
    if factor == 1:
        return frame.astype(np.float64)
    rows, cols = frame.shape
    sums = _blocks(_pad(frame, factor, 0), factor).sum(axis=(1, 3), dtype=np.float64)
    row_n = np.minimum(factor, rows - factor * np.arange(sums.shape[0]))
    col_n = np.minimum(factor, cols - factor * np.arange(sums.shape[1]))
    return sums / np.outer(row_n, col_n)


def _rgb(color: str) -> np.ndarray:
    """``"#rrggbb"`` -> uint8 RGB, without importing matplotlib."""
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)


def _figure(shape: tuple[int, int], title: str) -> tuple[Figure, Axes]:
    """A figure whose image area keeps the detector's aspect, axes in detector pixels."""
    figure_cls, canvas_cls = _matplotlib()
    rows, cols = shape
    scale = _IMAGE_PX / max(rows, cols)
    width_in = max(cols * scale, _MIN_IMAGE_PX) / _DPI + _MARGIN_W_IN
    height_in = max(rows * scale, _MIN_IMAGE_PX) / _DPI + _MARGIN_H_IN
    fig = figure_cls(
        figsize=(max(width_in, _MIN_FIG_W_IN), height_in),
        dpi=_DPI,
        layout="constrained",
        facecolor="white",
    )
    canvas_cls(fig)
    ax = fig.add_subplot()
    # Limits on pixel edges, row 0 at the top, as detector images are viewed.
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xlabel("column (detector pixel)")
    ax.set_ylabel("row (detector pixel)")
    ax.set_title(title, fontsize="medium")
    return fig, ax


def _trim(fig: Figure, ax: Axes) -> None:
    """Shrink the figure by the blank the fixed aspect leaves beside (or above) the image.

    Tick labels that overhung into that blank then need room of their own,
    and a colorbar takes its share of the change, so a first trim by the
    whole blank may squeeze the image; the second try gives back the
    shortfall with some margin, the third restores the size. Each try is a
    layout without rendering, about 0.1 s for a 4M detector.
    """
    allotted, active = ax.get_position(original=True), ax.get_position(original=False)
    width_in, height_in = fig.get_size_inches()
    spare_w = (allotted.width - active.width) * width_in
    spare_h = (allotted.height - active.height) * height_in
    if max(spare_w, spare_h) < 0.05:
        return
    along_w = spare_w >= spare_h  # trim the width, keeping the image height
    full = width_in if along_w else height_in
    target = ax.get_window_extent()

    def shortfall(size: float) -> float:
        """Inches the image lost along the trimmed side at this figure size."""
        fig.set_size_inches((size, height_in) if along_w else (width_in, size))
        fig.draw_without_rendering()
        box = ax.get_window_extent()
        lost = target.width - box.width if along_w else target.height - box.height
        return max(lost, 0.0) / fig.dpi

    size = full - (spare_w if along_w else spare_h)
    if along_w:
        size = max(size, _MIN_FIG_W_IN)
    lost = shortfall(size)
    if lost * fig.dpi <= 0.5:
        return
    if shortfall(min(size + 1.5 * lost + 0.05, full)) * fig.dpi > 0.5:
        shortfall(full)


def _block_factor(ax: Axes, shape: tuple[int, int]) -> int:
    """Smallest block size for which every block gets at least one screen pixel.

    The image is reduced by blocks here rather than by matplotlib, whose
    resampling would drop or fade 1-pixel lines; drawn no larger than the
    axes, nearest-neighbour upsampling then shows every block. Needs the
    layout done (``fig.draw_without_rendering()``).
    """
    box = ax.get_window_extent()
    # One pixel of slack for rounding at the axes edges.
    width, height = max(box.width - 1.0, 1.0), max(box.height - 1.0, 1.0)
    rows, cols = shape
    return max(1, math.ceil(max(rows / height, cols / width)))


def _layout(fig: Figure, ax: Axes, shape: tuple[int, int]) -> int:
    """Lay the figure out, trimmed to the image; return the block size to draw with."""
    fig.draw_without_rendering()
    _trim(fig, ax)
    return _block_factor(ax, shape)


def _show(ax: Axes, image: np.ndarray, factor: int) -> None:
    rows, cols = image.shape[:2]
    # Each block spans ``factor`` detector pixels, so ticks stay in detector
    # pixels; the padded part of the last blocks lies outside the axes limits.
    ax.imshow(
        image,
        extent=(-0.5, cols * factor - 0.5, rows * factor - 0.5, -0.5),
        interpolation="nearest",
        origin="upper",
        aspect="equal",
    )


def _save(fig: Figure, path: str | PathLike[str]) -> Path:
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    # PNG whatever the suffix: the block reduction is tuned to this raster size.
    fig.savefig(out, format="png", dpi=_DPI, facecolor="white")
    return out.resolve()


def _legend(
    fig: Figure,
    entries: Sequence[tuple[str, str]],
    *,
    title: str | None = None,
    loc: Literal["outside right upper", "outside lower right"] = "outside right upper",
) -> None:
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=color, edgecolor="0.3", linewidth=0.5, label=label)
        for color, label in entries
    ]
    fig.legend(
        handles=handles,
        loc=loc,
        title=title,
        fontsize="small",
        title_fontsize="small",
        frameon=False,
    )


def record_title(record: MaskRecord) -> str:
    """The standard picture title for one mask version.

    Detector and name, version, full uid and the masked fraction of the
    detector, as the CLI prints them.

    Parameters
    ----------
    record : MaskRecord
        As returned by :meth:`chx_masks.MaskRegistry.describe`.

    Returns
    -------
    str

    Examples
    --------
    >>> from chx_masks import MaskRecord
    >>> r = MaskRecord(uid="0f4c2a9e-58d1-4c6b-9a57-2b0e7c1d3f11",
    ...                detector="eiger500K_single_image", name="chip_mask",
    ...                version=2, registered_at=None, superseded_at=None,
    ...                retired_at=None, sha256="0" * 64, shape=(514, 1030),
    ...                masked_pixels=26_470, metadata={})
    >>> record_title(r)
    'eiger500K_single_image/chip_mask v2  0f4c2a9e-58d1-4c6b-9a57-2b0e7c1d3f11  masked 5.00%'
    """
    version = "legacy" if record.version is None else f"v{record.version}"
    total = int(np.prod(record.shape))
    return (
        f"{record.detector}/{record.name} {version}  {record.uid}  "
        f"masked {_percent(record.masked_pixels, total)}"
    )


def mask_png(mask: np.ndarray, path: str | PathLike[str], *, title: str) -> Path:
    """Write a picture of one mask: kept pixels light grey, masked pixels crimson.

    Larger masks are reduced by blocks before drawing, a block being masked if
    any pixel in it is, so 1-pixel chip lines and single hot pixels stay
    visible. Axes are in detector pixels.

    Parameters
    ----------
    mask : numpy.ndarray
        2-D bool, True = pixel kept.
    path : str or os.PathLike
        Where to write the PNG; missing parent directories are created.
    title : str
        Title above the picture, e.g. from :func:`record_title`.

    Returns
    -------
    pathlib.Path
        The resolved path written.

    Raises
    ------
    MaskValidationError
        If ``mask`` is not a 2-D bool array.
    ChxMasksError
        If matplotlib is not installed.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> mask = np.ones((514, 1030), bool)
    >>> mask[:, 512:518] = False  # the gap between the two modules
    >>> out = mask_png(mask, os.path.join(tempfile.mkdtemp(), "gap.png"), title="gap")
    >>> out.name, out.stat().st_size > 0
    ('gap.png', True)
    """
    keep = _check_mask(mask)
    masked = int(keep.size - np.count_nonzero(keep))
    fig, ax = _figure(keep.shape, title)
    _legend(fig, [(MASKED_COLOR, f"masked: {masked:,} px ({_percent(masked, keep.size)})")])
    factor = _layout(fig, ax, keep.shape)
    lut = np.stack([_rgb(MASKED_COLOR), _rgb(KEPT_COLOR)])
    _show(ax, lut[_block_kept(keep, factor).view(np.uint8)], factor)
    return _save(fig, path)


def _component_label(name: str, version: int | None, masked: int, total: int) -> str:
    version_str = "legacy" if version is None else f"v{version}"
    return f"{name} {version_str} ({_percent(masked, total)})"


def _composite_title(composite: CompositeMask) -> str:
    total = int(composite.mask.size)
    masked = int(total - np.count_nonzero(composite.mask))
    n = len(composite.names)
    return (
        f"{composite.detector}: {n} component{'s' if n != 1 else ''}  "
        f"sha256 {composite.sha256[:12]}  masked {_percent(masked, total)}"
    )


def composite_png(
    composite: CompositeMask, path: str | PathLike[str], *, title: str | None = None
) -> Path:
    """Write a picture of a composite mask, each component in its own colour.

    Pixels masked by two or more components are black ("several"). Where a
    reduced block holds pixels of different components, the overlap colour
    wins, then the component masking the fewest pixels overall, so small
    features (hot pixels) are not hidden under large ones (beamstop).

    Parameters
    ----------
    composite : CompositeMask
        From :meth:`chx_masks.MaskRegistry.resolve_composite`.
    path : str or os.PathLike
        Where to write the PNG; missing parent directories are created.
    title : str, optional
        By default: detector, number of components, short sha256 of the
        composite and its masked fraction.

    Returns
    -------
    pathlib.Path
        The resolved path written.

    Raises
    ------
    MaskValidationError
        If a component is not a 2-D bool array of the composite's shape.
    ChxMasksError
        If matplotlib is not installed.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> from chx_masks import CompositeMask
    >>> gap = np.ones((514, 1030), bool); gap[:, 512:518] = False
    >>> stop = np.ones((514, 1030), bool); stop[200:300, 400:600] = False
    >>> c = CompositeMask("eiger500K_single_image", ("gap", "beamstop"),
    ...                   ("u1", "u2"), (0, 3), "ab" * 32, mask=gap & stop,
    ...                   components=(gap, stop))
    >>> out = composite_png(c, os.path.join(tempfile.mkdtemp(), "c.png"))
    >>> out.suffix
    '.png'
    """
    shape = _check_mask(composite.mask, "composite mask").shape
    if not composite.components or len(composite.components) != len(composite.names):
        raise MaskValidationError(
            f"The composite has {len(composite.components)} component arrays for "
            f"{len(composite.names)} names; build it with MaskRegistry.resolve_composite."
        )
    comps = []
    for name, component in zip(composite.names, composite.components, strict=True):
        comp = _check_mask(component, f"component {name!r}")
        if comp.shape != shape:
            raise MaskValidationError(
                f"Component {name!r} has shape {shape_str(comp.shape)} but the "
                f"composite is {shape_str(shape)}; all must be the detector's shape."
            )
        comps.append(comp)
    total = int(np.prod(shape))
    masked = [~m for m in comps]
    sizes = [int(np.count_nonzero(m)) for m in masked]
    n = len(comps)
    colors = [COMPONENT_COLORS[i % len(COMPONENT_COLORS)] for i in range(n)]

    # Per-pixel code, higher wins when blocks are reduced by max: 0 kept,
    # 1..n components from most to fewest masked pixels, n + 1 several.
    order = sorted(range(n), key=lambda i: sizes[i], reverse=True)
    codes = np.zeros(shape, dtype=np.uint16)
    count = np.zeros(shape, dtype=np.uint16)
    for rank, i in enumerate(order, start=1):
        codes[masked[i]] = rank
        count += masked[i]
    several = count >= 2
    codes[several] = n + 1
    n_several = int(np.count_nonzero(several))
    lut = np.stack([_rgb(KEPT_COLOR)] + [_rgb(colors[i]) for i in order] + [_rgb(SEVERAL_COLOR)])

    fig, ax = _figure(shape, title if title is not None else _composite_title(composite))
    entries = [
        (colors[i], _component_label(composite.names[i], composite.versions[i], sizes[i], total))
        for i in range(n)
    ]
    entries.append((SEVERAL_COLOR, f"several ({_percent(n_several, total)})"))
    _legend(fig, entries, title="masked by")
    factor = _layout(fig, ax, shape)
    _show(ax, lut[_block_max(codes, factor)], factor)
    return _save(fig, path)


def _frame_norm(values: np.ndarray) -> tuple[SymLogNorm, str]:
    """Colour scale for the kept blocks of a frame, and the colorbar's ``extend``.

    Linear from 0 to 1 count and logarithmic above, so empty pixels need no
    special case. The top is the 99.99th percentile: a few hot pixels would
    otherwise set it and leave the rest dark; they still stand out in the
    top colour.
    """
    from matplotlib.colors import SymLogNorm

    values = values[np.isfinite(values)]
    vmin, vmax, top = 0.0, 1.0, 1.0
    if values.size:
        vmin, top = min(0.0, float(values.min())), float(values.max())
        vmax = float(np.quantile(values, _VMAX_QUANTILE))
    vmax = max(vmax, vmin + 1.0)
    norm = SymLogNorm(linthresh=1.0, linscale=1.0, vmin=vmin, vmax=vmax, base=10)
    return norm, "max" if top > vmax else "neither"


def frame_png(
    frame: np.ndarray,
    path: str | PathLike[str],
    *,
    mask: np.ndarray | None = None,
    title: str,
) -> Path:
    """Write a detector frame on a log colour scale, masked pixels in crimson.

    Larger frames are reduced to the mean of each block; with a mask, a block
    holding any masked pixel is drawn crimson, and the colour scale is set by
    the kept blocks only (so a masked hot pixel does not darken the rest).
    The scale is linear from 0 to 1 count and logarithmic above (symlog),
    so empty pixels need no special case. Drawing the same frame with and
    without ``mask`` gives two pictures to compare side by side.

    Parameters
    ----------
    frame : numpy.ndarray
        2-D counts, e.g. uint16 or uint32.
    path : str or os.PathLike
        Where to write the PNG; missing parent directories are created.
    mask : numpy.ndarray, optional
        2-D bool of the frame's shape, True = pixel kept.
    title : str
        Title above the picture.

    Returns
    -------
    pathlib.Path
        The resolved path written.

    Raises
    ------
    MaskValidationError
        If ``frame`` is not a 2-D numeric array, or ``mask`` not a 2-D bool
        array (FrameShapeError, a MaskValidationError, if not of the
        frame's shape).
    ChxMasksError
        If matplotlib is not installed.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> frame = np.random.default_rng(0).poisson(0.1, (514, 1030)).astype(np.uint32)
    >>> mask = np.ones(frame.shape, bool); mask[:, 512:518] = False
    >>> out = frame_png(frame, os.path.join(tempfile.mkdtemp(), "f.png"),
    ...                 mask=mask, title="one frame")
    >>> out.exists()
    True
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import SymLogNorm

    data = _check_frame(frame)
    keep = None
    if mask is not None:
        keep = _check_mask(mask)
        if keep.shape != data.shape:
            raise FrameShapeError(
                f"The frame is {shape_str(data.shape)} but the mask is "
                f"{shape_str(keep.shape)}: it belongs to a detector of another shape. "
                "Use the masks of the detector that took the frame."
            )
    # Eiger firmware flags gaps and bad pixels with the dtype's maximum: they
    # are not counts, so they stay out of the colour scale (still drawn).
    unflagged = None
    if data.dtype.kind == "u":
        flagged = data == np.iinfo(data.dtype).max
        if flagged.any():
            unflagged = ~flagged
    fig, ax = _figure(data.shape, title)
    if keep is not None:
        masked = int(keep.size - np.count_nonzero(keep))
        _legend(
            fig,
            [(MASKED_COLOR, f"masked: {masked:,} px ({_percent(masked, keep.size)})")],
            loc="outside lower right",
        )
    cmap = colormaps[FRAME_CMAP].with_extremes(bad=NAN_COLOR)

    def add_colorbar(norm: SymLogNorm, factor: int, extend: str) -> Colorbar:
        blocks = f" (mean of {factor}\u00d7{factor} blocks)" if factor > 1 else ""
        return fig.colorbar(
            ScalarMappable(norm=norm, cmap=cmap),
            ax=ax,
            shrink=0.8,
            extend=extend,
            label=f"counts per pixel{blocks}; log scale above 1",
        )

    # The layout must include a colorbar, whose limits are known only once
    # the blocks are: lay out with a stand-in, then check the real one did
    # not take more room.
    colorbar = add_colorbar(SymLogNorm(1.0, vmin=0.0, vmax=10.0), 2, "neither")
    factor = _layout(fig, ax, data.shape)
    for _ in range(3):
        values = _block_mean(data, factor)
        kept = np.ones(values.shape, bool) if keep is None else _block_kept(keep, factor)
        scaled = kept if unflagged is None else kept & _block_kept(unflagged, factor)
        norm, extend = _frame_norm(values[scaled])
        colorbar.remove()
        colorbar = add_colorbar(norm, factor, extend)
        fig.draw_without_rendering()
        drawn = factor
        factor = _block_factor(ax, data.shape)
        if factor <= drawn:
            break
    rgba = cmap(norm(np.ma.masked_invalid(values)), bytes=True)
    rgba[~kept] = (*_rgb(MASKED_COLOR), 255)
    _show(ax, rgba, drawn)
    return _save(fig, path)
