"""Mask files in and out of the registry: NumPy, TIFF, EDF, Fit2D, NeXus/Eiger and index lists.

Used by beamline staff and analysis code to bring masks made by pyFAI, fabio,
Eiger firmware or older CHX notebooks into a :class:`~chx_masks.MaskRegistry`,
and to hand registered masks back to those tools.

chx_masks masks are True where a pixel is *kept*; pyFAI, fabio, Fit2D and
NeXus store nonzero where a pixel is *masked*. Every function here converts
at the file boundary, by a per-format default that ``convention=`` overrides:

=======  ==============  ==================================  ========================
format   suffixes        default convention when reading     when writing
=======  ==============  ==================================  ========================
npy      .npy            bool: "keep"; other dtypes: given   "keep" (bool)
npz      .npz            bool: "keep"; other dtypes: given   "keep" (bool)
tiff     .tif .tiff      bool: "keep"; other dtypes: given   must be given
edf      .edf            "masked-nonzero" (pyFAI, fabio)     "masked-nonzero" (uint8)
msk      .msk            "masked-nonzero" (Fit2D)            "masked-nonzero" (uint8)
nexus    .h5 .hdf5 .nxs  "masked-nonzero" (Eiger)            "masked-nonzero" (uint32)
indices  .txt            "masked-nonzero": listed = masked   "masked-nonzero"
=======  ==============  ==================================  ========================

A 0/1 integer array in a ``.npy`` or ``.tiff`` file is refused without
``convention=``, because both habits exist at CHX and guessing wrong inverts
the mask silently. For the same reason a TIFF is written only with an
explicit ``convention=``: pyFAI and fabio read a TIFF mask as nonzero =
masked, chx-masks reads a bool TIFF as True = kept.

Messages speak Python (``convention=``); each also carries the command line's
words (``--convention``) for ``chx-masks`` to print.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._content import coerce_mask, mask_sha256, shape_str
from ._errors import MaskNotFoundError, MaskValidationError
from ._formats import (
    _NONZERO_MASKED,
    NEXUS_PIXEL_MASK,
    Convention,
    Format,
    _bad,
    _check_convention,
    _file_sha256,
    _read_fabio,
    _read_indices,
    _read_nexus,
    _read_npy,
    _read_npz,
    _read_tiff,
    _resolve_format,
    _to_keep,
    _write_file,
)
from ._hdf5 import h5py_with_filters
from ._sources import register_with_source
from ._version import __version__

if TYPE_CHECKING:
    from ._registry import MaskRegistry

__all__ = [
    "NEXUS_PIXEL_MASK",
    "export_convention",
    "export_mask",
    "h5py_with_filters",
    "ingest_master_file",
    "read_mask",
    "register_from_file",
    "write_mask",
]


def read_mask(
    path: str | os.PathLike[str],
    *,
    format: Format | None = None,
    convention: Convention | None = None,
    shape: tuple[int, int] | None = None,
    dataset: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a mask file as a chx_masks mask (True = kept) and describe its source.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    format : {"npy", "npz", "tiff", "edf", "msk", "nexus", "indices"}, optional
        Taken from the suffix when omitted (see the module docstring).
    convention : {"keep", "masked-nonzero"}, optional
        How the file marks pixels: ``"keep"`` (True/1 = kept) or
        ``"masked-nonzero"`` (nonzero = masked). Default: the format's own
        (module docstring); required for non-bool npy/npz/tiff arrays. For
        ``indices`` it says whether the listed pixels are masked (default) or kept.
    shape : tuple of int, optional
        Detector shape (rows, cols); required for ``indices``, checked otherwise.
    dataset : str, optional
        The array key in an ``.npz`` or the dataset path in HDF5. HDF5 default:
        :data:`NEXUS_PIXEL_MASK`, then any dataset named ``pixel_mask``.

    Returns
    -------
    mask : numpy.ndarray
        2-D bool, True = pixel kept.
    source : dict
        JSON-able provenance: ``kind``, ``path`` (absolute), ``file_name``,
        ``file_sha256``, ``format``, ``convention``, ``dataset`` (if any),
        ``libraries`` (versions used) and ``chx_masks`` (version).

    Raises
    ------
    MaskValidationError
        The file is missing, truncated, not in its format, or not a 2-D mask.

    Examples
    --------
    >>> import numpy as np, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "bad_pixels.edf"
    >>> pyfai_style = np.zeros((4, 6), dtype=np.uint8)
    >>> pyfai_style[1, 2] = 1                       # nonzero = masked
    >>> import fabio.edfimage
    >>> fabio.edfimage.EdfImage(data=pyfai_style).write(str(path))
    >>> mask, source = read_mask(path)
    >>> bool(mask[1, 2]), int(mask.sum())           # True = kept
    (False, 23)
    >>> source["format"], source["convention"], source["file_name"]
    ('edf', 'masked-nonzero', 'bad_pixels.edf')
    """
    path = Path(path).expanduser().absolute()
    fmt = _resolve_format(path, format)
    _check_convention(path, convention)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise _bad(path, f"{what}; expected a {fmt} mask file.")
    if shape is not None:
        shape = (int(shape[0]), int(shape[1]))
    file_sha256 = _file_sha256(path)
    libraries: dict[str, str] = {"numpy": np.__version__}
    if fmt == "indices":
        listed, _ = _read_indices(path, shape)
        used: str = convention or "masked-nonzero"
        mask = ~listed if used == "masked-nonzero" else listed
        used_dataset = None
    else:
        reader = {
            "npy": _read_npy,
            "npz": _read_npz,
            "tiff": _read_tiff,
            "nexus": _read_nexus,
            "edf": lambda p, d: _read_fabio(p, "edf"),
            "msk": lambda p, d: _read_fabio(p, "msk"),
        }[fmt]
        raw, used_dataset, libs = reader(path, dataset)
        libraries.update(libs)
        mask, used = _to_keep(raw, fmt, convention, path)
    if shape is not None and mask.shape != shape:
        hint = " It is transposed." if mask.shape == shape[::-1] else ""
        raise _bad(
            path, f"holds a {shape_str(mask.shape)} mask; expected {shape_str(shape)}.{hint}"
        )
    source: dict[str, Any] = {
        "kind": "file",
        "path": str(path),
        "file_name": path.name,
        "file_sha256": file_sha256,
        "format": fmt,
        "convention": used,
    }
    if used_dataset is not None:
        source["dataset"] = used_dataset
    source["libraries"] = libraries
    source["chx_masks"] = __version__
    return np.ascontiguousarray(mask, dtype=bool), source


def write_mask(
    mask: Any,
    path: str | os.PathLike[str],
    *,
    format: Format | None = None,
    convention: Convention | None = None,
) -> Path:
    """Write a chx_masks mask (True = kept) in a file format other tools read.

    Each format gets its own convention unless ``convention`` is given:
    npy/npz a bool array, True = kept (with ``"masked-nonzero"``: uint8,
    1 = masked); edf and msk uint8, 1 = masked (fabio, pyFAI, Fit2D); nexus
    uint32 at :data:`NEXUS_PIXEL_MASK`, nonzero = masked (Eiger); indices the
    flat C-order indices of the masked pixels, one per line. A TIFF has no
    convention of its own (pyFAI reads nonzero = masked, chx-masks a bool
    TIFF as True = kept), so ``convention`` must be given for it:
    ``"masked-nonzero"`` writes uint8, 1 = masked; ``"keep"`` a bool image.
    An existing file is overwritten.

    Parameters
    ----------
    mask : array-like of bool
        2-D, True = pixel kept; a dask array is computed.
    path : str or os.PathLike
        Where to write; the format is taken from its suffix unless given.
    format : {"npy", "npz", "tiff", "edf", "msk", "nexus", "indices"}, optional
    convention : {"keep", "masked-nonzero"}, optional
        Default: the format's own (:func:`export_convention`); required for TIFF.

    Returns
    -------
    pathlib.Path
        The absolute path written.

    Raises
    ------
    MaskValidationError
        ``mask`` is not a 2-D bool array, or a TIFF is asked for without
        ``convention``; nothing is written.

    Examples
    --------
    >>> import numpy as np, pathlib, tempfile
    >>> mask = np.ones((4, 6), dtype=bool)
    >>> mask[0, 1] = False
    >>> path = write_mask(mask, pathlib.Path(tempfile.mkdtemp()) / "m.txt")
    >>> path.read_text().splitlines()[-1]                  # flat index of [0, 1]
    '1'
    >>> bool((read_mask(path, shape=(4, 6))[0] == mask).all())
    True
    """
    path = Path(path).expanduser().absolute()
    fmt = _resolve_format(path, format)
    _check_convention(path, convention)
    used = _writing_convention(path, fmt, convention)
    array = np.asarray(mask)
    if array.dtype != np.bool_ or array.ndim != 2:
        raise MaskValidationError(
            f"write_mask takes a 2-D bool mask (True = kept); got {array.ndim}-D "
            f"{array.dtype}. Convert it first, e.g. with read_mask(..., convention=...)."
        )
    _write_file(array, path, fmt, used)
    return path


def export_convention(format: Format) -> Convention | None:
    """The convention a format is written in by default; None where it must be given.

    Examples
    --------
    >>> export_convention("edf"), export_convention("npy"), export_convention("tiff")
    ('masked-nonzero', 'keep', None)
    """
    if format == "tiff":
        return None
    return "masked-nonzero" if format in _NONZERO_MASKED else "keep"


def _writing_convention(path: Path, fmt: Format, convention: str | None) -> str:
    """The convention ``path`` will be written in, or the refusal of a TIFF without one."""
    used = convention or export_convention(fmt)
    if used is None:
        said = "TIFF masks are read both ways, so the convention to write must be given"
        raise _bad(
            path,
            f"{said}: convention='masked-nonzero' (nonzero = masked, as pyFAI "
            "and fabio read it) or convention='keep' (True = kept, as chx-masks reads "
            "a bool TIFF).",
            cli=f"{said}: --convention masked-nonzero (pyFAI, "
            "fabio) or --convention keep (chx-masks).",
        )
    return used


def _coerce_for(registry: MaskRegistry, detector: str, mask: np.ndarray, path: Path) -> np.ndarray:
    shape = registry.get_detector(detector).shape
    try:
        return coerce_mask(mask, shape, detector)
    except MaskValidationError as err:
        raise _bad(path, str(err), cli=err.cli_message) from err


def _read_for(
    registry: MaskRegistry, detector: str, path: str | os.PathLike[str], read_kw: dict[str, Any]
) -> tuple[np.ndarray, dict[str, Any], Path]:
    absolute = Path(path).expanduser().absolute()
    shape = registry.get_detector(detector).shape
    # An index list carries no shape of its own; the detector's is the right one.
    if read_kw.get("shape") is None and _resolve_format(absolute, read_kw.get("format")) == (
        "indices"
    ):
        read_kw = {**read_kw, "shape": shape}
    mask, source = read_mask(absolute, **read_kw)
    return _coerce_for(registry, detector, mask, absolute), source, absolute


def register_from_file(
    registry: MaskRegistry,
    detector: str,
    name: str,
    path: str | os.PathLike[str],
    *,
    update: bool = False,
    metadata: Mapping[str, Any] | None = None,
    force: bool = False,
    **read_kw: Any,
) -> str:
    """Read a mask file and register it, recording the file as its ``source``.

    Parameters
    ----------
    registry : MaskRegistry
    detector, name : str
        The lineage to start (or, with ``update=True``, to add a version to).
    path : str or os.PathLike
        The mask file; read with :func:`read_mask`.
    update : bool
        Add the next version with ``update_mask`` instead of ``register_mask``.
    metadata : dict, optional
        User metadata; ``"source"`` (the dict :func:`read_mask` returns) is
        added. With ``update=True`` and no metadata, the previous version's
        metadata is kept and its ``source`` replaced.
    force : bool
        With ``update=True``, add the version even if the file holds exactly
        the current version's mask (refused otherwise, see ``update_mask``).
    **read_kw
        ``format``, ``convention``, ``shape``, ``dataset`` for :func:`read_mask`;
        an index list (``.txt``) takes the detector's shape by default.

    Returns
    -------
    str
        The uid of the new mask version.

    Raises
    ------
    MaskValidationError
        The file cannot be read as a mask of the detector's shape; nothing is
        registered.
    MaskExistsError
        The name is registered (without ``update``), or the file holds the
        current version's mask (with ``update`` and without ``force``).

    Examples
    --------
    >>> import numpy as np, pathlib, tempfile
    >>> from chx_masks import MaskRegistry
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> mask = np.ones((514, 1030), dtype=bool)
    >>> mask[:, 512:518] = False
    >>> np.save(tmp / "gap.npy", mask)
    >>> with MaskRegistry.embedded(tmp / "registry") as reg:
    ...     uid = register_from_file(reg, "eiger500K_single_image", "gap", tmp / "gap.npy")
    ...     reg.describe(uid).metadata["source"]["file_name"]
    'gap.npy'
    """
    array, source, _ = _read_for(registry, detector, path, dict(read_kw))
    return register_with_source(
        registry, detector, name, array, source, update=update, metadata=metadata, force=force
    )


def export_mask(
    registry: MaskRegistry,
    detector: str,
    name: str,
    path: str | os.PathLike[str],
    *,
    version: int | None = None,
    uid: str | None = None,
    format: Format | None = None,
    convention: Convention | None = None,
) -> Path:
    """Write a registered mask (current, a ``version``, or a ``uid``) to a file.

    The file uses the format's own convention (see :func:`write_mask` and
    :func:`export_convention`), so pyFAI reads an exported ``.edf``
    directly; a TIFF needs ``convention`` (``"masked-nonzero"`` for pyFAI).

    Returns
    -------
    pathlib.Path
        The absolute path written.

    Raises
    ------
    MaskValidationError
        ``uid`` names a mask of another detector or name, or a TIFF is
        asked for without ``convention``; nothing is written.

    Examples
    --------
    >>> import numpy as np, pathlib, tempfile
    >>> from chx_masks import MaskRegistry
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> with MaskRegistry.embedded(tmp / "registry") as reg:
    ...     _ = reg.register_mask("eiger500K_single_image", "all", np.ones((514, 1030), bool))
    ...     export_mask(reg, "eiger500K_single_image", "all", tmp / "all.edf").name
    'all.edf'
    """
    path = Path(path).expanduser().absolute()
    _check_convention(path, convention)
    _writing_convention(path, _resolve_format(path, format), convention)  # before reading
    if uid is not None:
        if version is not None:
            raise MaskValidationError(
                "Give version= or uid=, not both.", cli="Give --version or --uid, not both."
            )
        record = registry.describe(uid)
        if (record.detector, record.name) != (detector, name):
            raise MaskValidationError(
                f"uid {uid} is {record.detector}/{record.name}, not {detector}/{name}."
            )
        array = registry.get_mask_by_uid(uid).compute()
    else:
        array = registry.get_mask(detector, name, version=version).compute()
    return write_mask(array, path, format=format, convention=convention)


def ingest_master_file(
    registry: MaskRegistry,
    detector: str,
    name: str,
    path: str | os.PathLike[str],
    *,
    dataset: str | None = None,
) -> tuple[str, bool]:
    """Register the ``pixel_mask`` of an Eiger master file, once per distinct content.

    The first call starts the lineage ``(detector, name)``; later calls add a
    version only when the mask differs from the current one, so this can run
    on every new master file. The file's nonzero pixels are masked.

    Parameters
    ----------
    registry : MaskRegistry
    detector, name : str
    path : str or os.PathLike
        An Eiger master (HDF5/NeXus) file.
    dataset : str, optional
        Default :data:`NEXUS_PIXEL_MASK`, then any dataset named ``pixel_mask``.

    Returns
    -------
    uid : str
        The current uid of the lineage after the call.
    created : bool
        Whether a new version was registered.

    Examples
    --------
    >>> import numpy as np, pathlib, tempfile
    >>> from chx_masks import MaskRegistry
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> eiger = np.zeros((514, 1030), dtype=np.uint32)
    >>> eiger[10, 20] = 2                                   # a dead pixel
    >>> master = write_mask(eiger == 0, tmp / "scan_master.h5")
    >>> with MaskRegistry.embedded(tmp / "registry") as reg:
    ...     first = ingest_master_file(reg, "eiger500K_single_image", "pixel_mask", master)
    ...     again = ingest_master_file(reg, "eiger500K_single_image", "pixel_mask", master)
    >>> first[1], again[1], first[0] == again[0]
    (True, False, True)
    """
    read_kw = {"format": "nexus", "dataset": dataset}
    array, source, _ = _read_for(registry, detector, path, read_kw)
    try:
        current = registry.get_mask_uid(detector, name)
    except MaskNotFoundError:
        return register_with_source(registry, detector, name, array, source), True
    if registry.describe(current).sha256 == mask_sha256(array):
        return current, False
    return register_with_source(registry, detector, name, array, source, update=True), True
