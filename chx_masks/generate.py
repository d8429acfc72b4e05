"""Mask generators: module gaps, chip lines, hot/dead pixels, beamstop shapes, growth.

Used by beamline staff and analysis code to *make* masks for the registry; each
result carries a ``source`` record that is stored with the mask and re-makes it.

Every generator returns a :class:`GeneratedMask`: a 2-D bool array (True = pixel
kept, False = masked, as everywhere in chx-masks) and a JSON-able ``source``::

    {"kind": "generator", "generator": "<function name>",
     "parameters": {...}, "libraries": {"numpy": "...", "pyFAI": "..."},
     "chx_masks": "<version>"}

:func:`remake` calls the generator a ``source`` names with its parameters, so a
mask read back from the registry can be re-derived and compared. Masks made
from data the source only fingerprints (:func:`hot_dead_pixels`, :func:`grow`
of a plain array) cannot be re-made that way; :func:`remake` says so.

Eiger geometry used here (rows x cols, 0-based, as in the CHX image data keys
and pyFAI's ``Eiger`` detectors):

- a module is 514 x 1030 pixels; modules are separated by 37-row and 10-column
  gaps (pyFAI ``Eiger.MODULE_GAP``); the 4M is 4 x 2 modules (2167 x 2070), the
  1M 2 x 1 (1065 x 1030), the 500K one module (514 x 1030);
- a module is 2 x 4 chips of 256 x 256 pixels; between two chips the read-out
  inserts two interpolated (double-size) pixel rows or columns, hence
  2 * 256 + 2 = 514 and 4 * 256 + 6 = 1030. Within a module the chips are at
  rows 0-255 and 258-513 (boundary rows 256, 257) and at columns 0-255,
  258-513, 516-771, 774-1029 (boundary columns 256-257, 514-515, 772-773).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._content import mask_sha256
from ._detectors import BUILTIN_DETECTORS
from ._errors import MaskValidationError
from ._geometry import CHIP_BOUNDARY as CHIP_BOUNDARY
from ._geometry import (
    CHIP_SIZE,
    CHIPS_PER_MODULE,
    MODULE_GAP,
    MODULE_SHAPE,
    PYFAI_DETECTORS,
    _array_sha256,
    _check_count,
    _check_point,
    _check_shape,
    _check_stack,
    _check_threshold,
    _chip_boundary_lines,
    _dilate,
    _even_odd_inside,
    _known_detector,
    _module_grid,
    _refuse_empty,
    _source,
)
from ._sources import register_with_source

if TYPE_CHECKING:
    from ._registry import MaskRegistry

__all__ = [
    "GeneratedMask",
    "chip_lines",
    "circle",
    "grow",
    "hot_dead_pixels",
    "module_gaps",
    "polygon",
    "rectangle",
    "remake",
]


@dataclass(frozen=True, eq=False)
class GeneratedMask:
    """A generated mask and the record of how it was made.

    Parameters
    ----------
    mask : numpy.ndarray
        2-D bool, True = pixel kept, False = masked; made read-only here.
    source : dict
        JSON-able: ``kind``, ``generator``, ``parameters``, ``libraries``,
        ``chx_masks``. Stored as ``metadata["source"]`` by :meth:`register`.

    Examples
    --------
    >>> g = circle((5, 5), center=(2, 2), radius=1)
    >>> g.masked_pixels, g.source["generator"], g.mask.flags.writeable
    (5, 'circle', False)
    """

    mask: np.ndarray
    source: dict[str, Any]

    def __post_init__(self) -> None:
        # Frozen only guards the attribute; a read-only array guards the
        # pixels, so a mask cannot drift from the source that describes it.
        self.mask.flags.writeable = False

    @property
    def masked_pixels(self) -> int:
        """Number of masked (False) pixels."""
        return int(self.mask.size - np.count_nonzero(self.mask))

    @property
    def sha256(self) -> str:
        """The registry's content hash of :attr:`mask` (see ``mask_sha256``)."""
        return mask_sha256(self.mask)

    def __repr__(self) -> str:
        return (
            f"GeneratedMask(generator={self.source.get('generator')!r}, "
            f"shape={self.mask.shape}, masked_pixels={self.masked_pixels})"
        )

    def register(
        self,
        registry: MaskRegistry,
        detector: str,
        name: str,
        *,
        update: bool = False,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> str:
        """Store the mask with ``{"source": source, **metadata}``; return its uid.

        Parameters
        ----------
        registry : MaskRegistry
        detector, name : str
            As for :meth:`MaskRegistry.register_mask`.
        update : bool
            Add the next version of an active lineage (``update_mask``)
            instead of starting one (``register_mask``).
        metadata : dict, optional
            Further metadata; may not contain the key ``"source"``. With
            ``update`` and no metadata, the previous version's metadata is kept.
        force : bool
            With ``update``, add the version even if it is identical to the
            current one (see :meth:`MaskRegistry.update_mask`).

        Examples
        --------
        >>> import tempfile
        >>> from chx_masks import MaskRegistry
        >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
        ...     g = circle((514, 1030), center=(250, 500), radius=20)
        ...     uid = g.register(reg, "eiger500K_single_image", "beamstop")
        ...     reg.describe(uid).metadata["source"]["generator"]
        'circle'
        """
        return register_with_source(
            registry,
            detector,
            name,
            self.mask,
            copy.deepcopy(self.source),
            update=update,
            metadata=metadata,
            force=force,
        )


# --------------------------------------------------------------------------- detectors


def module_gaps(detector: str) -> GeneratedMask:
    """Mask the gaps between Eiger modules, from pyFAI's detector definition.

    Parameters
    ----------
    detector : str
        CHX image data key: ``"eiger4m_single_image"`` (pyFAI ``Eiger4M``),
        ``"eiger1m_single_image"`` (``Eiger1M``) or ``"eiger500K_single_image"``
        (``Eiger500k``, one module: nothing is masked).

    Returns
    -------
    GeneratedMask
        False on pyFAI's gap pixels. For the 4M: rows 514-550, 1065-1101,
        1616-1652 and columns 1030-1039.

    Raises
    ------
    MaskValidationError
        Unknown detector, or pyFAI's shape differs from the CHX detector's.

    Examples
    --------
    >>> g = module_gaps("eiger1m_single_image")
    >>> g.mask.shape, g.masked_pixels, bool(g.mask[514:551].any())
    ((1065, 1030), 38110, False)
    """
    _known_detector(detector)
    import pyFAI
    from pyFAI.detectors import detector_factory

    pyfai_name = PYFAI_DETECTORS[detector]
    pyfai_detector = detector_factory(pyfai_name)
    expected = BUILTIN_DETECTORS[detector].shape
    if tuple(pyfai_detector.shape) != tuple(expected):
        raise MaskValidationError(
            f"pyFAI {pyfai_name} is {pyfai_detector.shape[0]}x{pyfai_detector.shape[1]} "
            f"but {detector!r} is {expected[0]}x{expected[1]}; the pyFAI definition "
            f"(version {pyFAI.version}) does not describe this detector."
        )
    gaps = pyfai_detector.mask
    # pyFAI's mask convention is the opposite of ours: nonzero = masked.
    mask = np.ones(expected, dtype=bool) if gaps is None else np.asarray(gaps) == 0
    return GeneratedMask(
        mask,
        _source(
            "module_gaps",
            {"detector": detector, "pyfai_detector": pyfai_name},
            {"pyFAI": str(pyFAI.version)},
        ),
    )


def chip_lines(detector: str, *, width: int = 1) -> GeneratedMask:
    """Mask the pixel rows and columns at the chip boundaries inside each Eiger module.

    Each 514 x 1030 module is 2 x 4 chips of 256 x 256 pixels; between two chips
    sit two interpolated (double-size) pixels. ``width`` pixels are masked on
    each side of every internal boundary: within a module, ``width=1`` masks
    rows 256-257 and columns 256-257, 514-515, 772-773; ``width=2`` masks rows
    255-258 and so on. Module gaps are left kept (see :func:`module_gaps`);
    modules sit at multiples of 514 + 37 rows and 1030 + 10 columns.

    Parameters
    ----------
    detector : str
        ``"eiger4m_single_image"``, ``"eiger1m_single_image"`` or
        ``"eiger500K_single_image"``.
    width : int
        Pixels masked on each side of each chip boundary, 1 to 128.

    Examples
    --------
    >>> g = chip_lines("eiger500K_single_image")
    >>> [int(r) for r in (~g.mask).all(axis=1).nonzero()[0]]
    [256, 257]
    >>> [int(c) for c in (~g.mask).all(axis=0).nonzero()[0]]
    [256, 257, 514, 515, 772, 773]
    """
    _known_detector(detector)
    width = _check_count(width, "width", minimum=1, maximum=CHIP_SIZE // 2)
    n_rows, n_cols = _module_grid(detector)
    row_lines = _chip_boundary_lines(CHIPS_PER_MODULE[0], width)
    col_lines = _chip_boundary_lines(CHIPS_PER_MODULE[1], width)
    shape = BUILTIN_DETECTORS[detector].shape
    masked_rows = np.zeros(shape[0], dtype=bool)
    masked_cols = np.zeros(shape[1], dtype=bool)
    for m in range(n_rows):
        masked_rows[m * (MODULE_SHAPE[0] + MODULE_GAP[0]) + row_lines] = True
    for m in range(n_cols):
        masked_cols[m * (MODULE_SHAPE[1] + MODULE_GAP[1]) + col_lines] = True
    mask = ~(masked_rows[:, None] | masked_cols[None, :])
    # A boundary row runs across the gap columns too; gaps are module_gaps' job.
    gap_rows = np.ones(shape[0], dtype=bool)
    gap_cols = np.ones(shape[1], dtype=bool)
    for m in range(n_rows):
        start = m * (MODULE_SHAPE[0] + MODULE_GAP[0])
        gap_rows[start : start + MODULE_SHAPE[0]] = False
    for m in range(n_cols):
        start = m * (MODULE_SHAPE[1] + MODULE_GAP[1])
        gap_cols[start : start + MODULE_SHAPE[1]] = False
    mask[gap_rows[:, None] | gap_cols[None, :]] = True
    return GeneratedMask(mask, _source("chip_lines", {"detector": detector, "width": width}))


# --------------------------------------------------------------------------- pixels


def hot_dead_pixels(
    darks: Any,
    *,
    flats: Any | None = None,
    hot_threshold: float,
    dead_threshold: float | None = None,
    allow_extreme: bool = False,
) -> GeneratedMask:
    """Mask hot pixels (from dark frames) and, optionally, dead ones (from flats).

    A pixel is *hot* if its mean dark count per frame exceeds ``hot_threshold``;
    it is *dead* if its mean flat-field count is below ``dead_threshold`` times
    the median over all pixels of the mean flat (module gaps included: they are
    a few per cent of an Eiger and do not move the median).

    The stacks are not stored: ``source["parameters"]`` holds the thresholds,
    frame counts, the numbers found and a sha256 of each stack (over dtype,
    shape and bytes), so a mask can be re-derived from the same files, but
    :func:`remake` cannot re-run this generator and raises
    :class:`MaskValidationError`.

    Parameters
    ----------
    darks : array-like, (frames, rows, cols)
        Dark frames, counts.
    flats : array-like, (frames, rows, cols), optional
        Flat-field frames with the same rows x cols; needs ``dead_threshold``.
    hot_threshold : float
        Counts per frame; no default, since it depends on exposure and energy.
    dead_threshold : float, optional
        Fraction of the median flat response, e.g. 0.1; needs ``flats``.
    allow_extreme : bool
        Accept a result that masks no pixel or every pixel (refused otherwise,
        as it usually means a threshold in the wrong units).

    Examples
    --------
    >>> darks = np.zeros((3, 4, 4), dtype=np.uint32)
    >>> darks[:, 1, 2] = 50
    >>> g = hot_dead_pixels(darks, hot_threshold=5)
    >>> [int(i) for i in np.argwhere(~g.mask)[0]], g.source["parameters"]["hot_pixels"]
    ([1, 2], 1)
    """
    dark_stack = _check_stack(darks, "darks")
    hot_threshold = _check_threshold(hot_threshold, "hot_threshold")
    if (flats is None) != (dead_threshold is None):
        raise MaskValidationError(
            "flats and dead_threshold go together: pass both to mask dead pixels, or "
            f"neither (got flats={'None' if flats is None else 'a stack'}, "
            f"dead_threshold={dead_threshold!r})."
        )
    frame_shape = dark_stack.shape[1:]
    hot = dark_stack.mean(axis=0, dtype=np.float64) > hot_threshold
    dead = np.zeros(frame_shape, dtype=bool)
    parameters: dict[str, Any] = {
        "hot_threshold": hot_threshold,
        "dead_threshold": None,
        "frame_shape": [int(n) for n in frame_shape],
        "n_dark_frames": int(dark_stack.shape[0]),
        "n_flat_frames": 0,
        "darks_sha256": _array_sha256(dark_stack),
        "flats_sha256": None,
    }
    if flats is not None:
        flat_stack = _check_stack(flats, "flats")
        dead_threshold = _check_threshold(dead_threshold, "dead_threshold")
        if flat_stack.shape[1:] != frame_shape:
            raise MaskValidationError(
                f"flats frames are {flat_stack.shape[1]}x{flat_stack.shape[2]} but darks "
                f"frames are {frame_shape[0]}x{frame_shape[1]}; both must be one detector."
            )
        flat_mean = flat_stack.mean(axis=0, dtype=np.float64)
        median = float(np.median(flat_mean))
        if median <= 0:
            raise MaskValidationError(
                f"The median flat response is {median}; flats must be illuminated frames."
            )
        dead = flat_mean < dead_threshold * median
        parameters.update(
            dead_threshold=dead_threshold,
            n_flat_frames=int(flat_stack.shape[0]),
            flats_sha256=_array_sha256(flat_stack),
            flat_median=median,
        )
    mask = ~(hot | dead)
    masked = int(mask.size - np.count_nonzero(mask))
    if not allow_extreme and (masked == 0 or masked == mask.size):
        which = "no pixel" if masked == 0 else f"every pixel ({masked})"
        counts = f"mask {which}: hot {int(hot.sum())}, dead {int(dead.sum())}."
        raise MaskValidationError(
            f"hot_threshold={hot_threshold}, dead_threshold={dead_threshold} {counts} "
            "Check the thresholds' units (counts per frame; fraction of the median "
            "flat), or pass allow_extreme=True if this is really meant.",
            cli=f"--threshold {hot_threshold} would {counts} --threshold is the mean "
            "dark counts per frame above which a pixel is hot; choose one between the "
            "dark level and the hot pixels' counts.",
        )
    parameters.update(
        hot_pixels=int(hot.sum()),
        dead_pixels=int(dead.sum()),
        masked_pixels=masked,
        allow_extreme=bool(allow_extreme),
    )
    return GeneratedMask(mask, _source("hot_dead_pixels", parameters))


# --------------------------------------------------------------------------- shapes


def circle(shape: Sequence[int], center: Sequence[float], radius: float) -> GeneratedMask:
    """Mask the pixels whose centres lie within ``radius`` of ``center`` (inclusive).

    Pixel ``(i, j)`` has its centre at ``(row, col) = (i, j)``. The circle may
    extend past the image edges but must cover at least one pixel centre.

    Parameters
    ----------
    shape : (int, int)
        Image rows, cols.
    center : (float, float)
        (row, col) in pixels.
    radius : float
        In pixels, > 0.

    Examples
    --------
    >>> circle((5, 5), center=(2, 2), radius=1).mask.astype(int)
    array([[1, 1, 1, 1, 1],
           [1, 1, 0, 1, 1],
           [1, 0, 0, 0, 1],
           [1, 1, 0, 1, 1],
           [1, 1, 1, 1, 1]])
    """
    rows, cols = _check_shape(shape)
    r0, c0 = _check_point(center, "center")
    if isinstance(radius, bool) or not isinstance(radius, (int, float, np.integer, np.floating)):
        raise MaskValidationError(f"radius must be a number of pixels; got {radius!r}.")
    radius = float(radius)
    if not math.isfinite(radius) or radius <= 0:
        raise MaskValidationError(f"radius must be finite and > 0 pixels; got {radius}.")
    r = np.arange(rows)[:, None] - r0
    c = np.arange(cols)[None, :] - c0
    inside = r * r + c * c <= radius * radius
    _refuse_empty(inside, "circle")
    return GeneratedMask(
        ~inside,
        _source(
            "circle",
            {"shape": [rows, cols], "center": [r0, c0], "radius": radius},
        ),
    )


def rectangle(
    shape: Sequence[int], top_left: Sequence[int], bottom_right: Sequence[int]
) -> GeneratedMask:
    """Mask a rectangle of pixels; both corner pixels are included (masked).

    ``rectangle(shape, (r0, c0), (r1, c1))`` masks ``mask[r0:r1 + 1, c0:c1 + 1]``;
    parts outside the image are ignored, but some pixel must be inside.

    Parameters
    ----------
    shape : (int, int)
    top_left, bottom_right : (int, int)
        (row, col) of the first and last masked pixel.

    Examples
    --------
    >>> rectangle((4, 5), top_left=(1, 1), bottom_right=(2, 3)).masked_pixels
    6
    """
    rows, cols = _check_shape(shape)
    corners = []
    for what, point in (("top_left", top_left), ("bottom_right", bottom_right)):
        try:
            values = tuple(point)
        except TypeError as err:
            raise MaskValidationError(f"{what} must be (row, col) ints; got {point!r}.") from err
        if len(values) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values
        ):
            raise MaskValidationError(f"{what} must be (row, col) ints; got {point!r}.")
        corners.append((int(values[0]), int(values[1])))
    (r0, c0), (r1, c1) = corners
    if r1 < r0 or c1 < c0:
        raise MaskValidationError(
            f"bottom_right {corners[1]} must not be above or left of top_left {corners[0]}."
        )
    inside = np.zeros((rows, cols), dtype=bool)
    # Clip by hand: a negative start would count from the end (wrap-around).
    inside[max(r0, 0) : max(r1 + 1, 0), max(c0, 0) : max(c1 + 1, 0)] = True
    _refuse_empty(inside, "rectangle")
    return GeneratedMask(
        ~inside,
        _source(
            "rectangle",
            {"shape": [rows, cols], "top_left": [r0, c0], "bottom_right": [r1, c1]},
        ),
    )


def polygon(shape: Sequence[int], vertices: Sequence[Sequence[float]]) -> GeneratedMask:
    """Mask the pixels whose centres lie inside a polygon (even-odd rule).

    Implemented with NumPy rather than ``matplotlib.path`` so that a stored
    source re-makes the same pixels whether or not matplotlib is installed.
    A centre exactly on an edge may fall either side; put vertices on half
    pixels (e.g. 1.5) for an unambiguous outline.

    Parameters
    ----------
    shape : (int, int)
    vertices : sequence of (row, col)
        At least 3; the polygon is closed automatically.

    Examples
    --------
    >>> polygon((6, 6), [(0.5, 0.5), (0.5, 3.5), (3.5, 3.5), (3.5, 0.5)]).masked_pixels
    9
    """
    rows, cols = _check_shape(shape)
    try:
        points = [_check_point(v, "each vertex") for v in vertices]
    except TypeError as err:
        raise MaskValidationError(
            f"vertices must be a sequence of (row, col); got {vertices!r}."
        ) from err
    if len(points) < 3:
        raise MaskValidationError(f"A polygon needs at least 3 vertices; got {len(points)}.")
    inside = _even_odd_inside(np.asarray(points, dtype=np.float64), rows, cols)
    _refuse_empty(inside, "polygon")
    return GeneratedMask(
        ~inside,
        _source(
            "polygon",
            {"shape": [rows, cols], "vertices": [[r, c] for r, c in points]},
        ),
    )


# --------------------------------------------------------------------------- operations


def grow(mask: GeneratedMask | np.ndarray, pixels: int) -> GeneratedMask:
    """Grow the masked (False) region by ``pixels`` in every direction.

    A pixel becomes masked if any masked pixel lies within ``pixels`` rows *and*
    ``pixels`` columns of it (a square, Chebyshev neighbourhood): one masked
    pixel grows to 3 x 3 for ``pixels=1``, 5 x 5 for 2. Outside the image counts
    as kept, so nothing grows in from the edges and nothing wraps around.

    Given a :class:`GeneratedMask`, its source is kept under
    ``parameters["input"]`` and :func:`remake` re-makes both; given a plain
    array, only its ``mask_sha256`` is kept and :func:`remake` refuses.

    Parameters
    ----------
    mask : GeneratedMask or numpy.ndarray
        2-D bool, True = kept.
    pixels : int
        >= 0; 0 returns a copy.

    Examples
    --------
    >>> m = np.ones((5, 5), dtype=bool)
    >>> m[2, 2] = False
    >>> grow(m, 1).masked_pixels, grow(m, 2).masked_pixels
    (9, 25)
    """
    input_source = mask.source if isinstance(mask, GeneratedMask) else None
    array = np.asarray(mask.mask if isinstance(mask, GeneratedMask) else mask)
    if array.dtype != np.bool_ or array.ndim != 2:
        raise MaskValidationError(
            f"grow needs a 2-D bool mask (True = kept); got {array.ndim}-D {array.dtype}."
        )
    pixels = _check_count(pixels, "pixels", minimum=0)
    masked = _dilate(~array, pixels)
    parameters: dict[str, Any] = {"pixels": pixels, "input_sha256": mask_sha256(array)}
    libraries: dict[str, str] = {}
    if input_source is not None:
        parameters["input"] = copy.deepcopy(input_source)
        libraries.update(input_source.get("libraries", {}))
    return GeneratedMask(~masked, _source("grow", parameters, libraries))


# --------------------------------------------------------------------------- remake


def _remake_grow(
    pixels: int, input_sha256: str, input: Mapping[str, Any] | None = None
) -> GeneratedMask:
    if input is None:
        raise MaskValidationError(
            "This grow() was applied to a plain array, not a GeneratedMask, so its "
            f"input is known only by its mask_sha256 {input_sha256}; grow that mask "
            "again (e.g. read it from the registry) to re-make it."
        )
    original = remake(input)
    if original.sha256 != input_sha256:
        raise MaskValidationError(
            f"Re-making grow()'s input gave a mask with sha256 {original.sha256}, not "
            f"the recorded {input_sha256}; the input generator now gives other pixels."
        )
    return grow(original, pixels)


def _remake_hot_dead_pixels(**parameters: Any) -> GeneratedMask:
    raise MaskValidationError(
        "hot_dead_pixels masks cannot be re-made from their source: the dark/flat "
        "stacks are not stored, only their sha256 (darks "
        f"{parameters.get('darks_sha256')}, flats {parameters.get('flats_sha256')}). "
        "Call hot_dead_pixels() again with the same stacks and thresholds."
    )


def _remake_module_gaps(detector: str, pyfai_detector: str | None = None) -> GeneratedMask:
    result = module_gaps(detector)
    if pyfai_detector is not None and result.source["parameters"]["pyfai_detector"] != (
        pyfai_detector
    ):
        raise MaskValidationError(
            f"The source used pyFAI detector {pyfai_detector!r}; {detector!r} now maps to "
            f"{result.source['parameters']['pyfai_detector']!r}."
        )
    return result


_REMAKERS: Mapping[str, Callable[..., GeneratedMask]] = {
    "module_gaps": _remake_module_gaps,
    "chip_lines": chip_lines,
    "hot_dead_pixels": _remake_hot_dead_pixels,
    "circle": circle,
    "rectangle": rectangle,
    "polygon": polygon,
    "grow": _remake_grow,
}


def remake(source: Mapping[str, Any]) -> GeneratedMask:
    """Call the generator a ``source`` record names, with its parameters.

    Parameters
    ----------
    source : dict
        A :attr:`GeneratedMask.source`, e.g. ``describe(uid).metadata["source"]``.

    Raises
    ------
    MaskValidationError
        Not a generator source, an unknown generator or parameters it does not
        take, or a generator whose input is not in the source
        (:func:`hot_dead_pixels`, :func:`grow` of a plain array).

    Examples
    --------
    >>> g = rectangle((4, 4), (0, 0), (1, 1))
    >>> bool((remake(g.source).mask == g.mask).all())
    True
    """
    if not isinstance(source, Mapping) or source.get("kind") != "generator":
        raise MaskValidationError(
            "remake needs a source record with kind 'generator' (a GeneratedMask.source "
            f"or metadata['source'] of a generated mask); got {source!r:.200}."
        )
    name = source.get("generator")
    if not isinstance(name, str) or name not in _REMAKERS:
        raise MaskValidationError(
            f"Unknown generator {name!r}; known: {', '.join(sorted(_REMAKERS))}."
        )
    parameters = source.get("parameters")
    if not isinstance(parameters, Mapping):
        raise MaskValidationError(f"source['parameters'] must be a dict; got {parameters!r}.")
    generator = _REMAKERS[name]
    try:
        inspect.signature(generator).bind(**parameters)
    except TypeError as err:
        raise MaskValidationError(
            f"The parameters {sorted(parameters)} do not fit generator {name!r}: {err}."
        ) from err
    return generator(**parameters)
