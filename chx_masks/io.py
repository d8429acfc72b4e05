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

import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ._content import coerce_mask, mask_sha256, shape_str
from ._errors import MaskNotFoundError, MaskValidationError
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

Format = Literal["npy", "npz", "tiff", "edf", "msk", "nexus", "indices"]
Convention = Literal["keep", "masked-nonzero"]

#: Where Eiger master files (and :func:`write_mask`) keep the detector's own mask.
NEXUS_PIXEL_MASK = "/entry/instrument/detector/detectorSpecific/pixel_mask"

_SUFFIXES: dict[str, Format] = {
    ".npy": "npy",
    ".npz": "npz",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".edf": "edf",
    ".msk": "msk",
    ".h5": "nexus",
    ".hdf5": "nexus",
    ".nxs": "nexus",
    ".txt": "indices",
}
_FORMATS: tuple[str, ...] = ("npy", "npz", "tiff", "edf", "msk", "nexus", "indices")
_CONVENTIONS: tuple[str, ...] = ("keep", "masked-nonzero")
# Formats whose own tools agree on "nonzero = masked"; the others say nothing.
_NONZERO_MASKED: frozenset[str] = frozenset({"edf", "msk", "nexus", "indices"})
_MAX_LISTED = 20


def _bad(path: Path, message: str, cli: str | None = None) -> MaskValidationError:
    """A refusal naming the file; ``cli`` is the message in the command line's words."""
    return MaskValidationError(
        f"Mask file '{path}': {message}",
        cli=None if cli is None else f"Mask file '{path}': {cli}",
    )


def _refused_by_numpy(path: Path, err: BaseException, what: str) -> MaskValidationError | None:
    """Our message where numpy refused ``path`` for ``allow_pickle=False``, else None.

    numpy's own message advises loading the file unsafely; a mask file never
    needs that, so it is not passed on. numpy takes any file without the .npy
    or zip header for a pickle, so the header tells the two cases apart.
    """
    if not (isinstance(err, ValueError) and "allow_pickle" in str(err)):
        return None
    with open(path, "rb") as f:
        head = f.read(6)
    # A pickle (protocol 2 and later), or an object array inside .npy/.npz.
    if head.startswith((b"\x80", b"\x93NUMPY", b"PK")):
        return _bad(
            path,
            "holds Python objects (pickled data), not a mask array, and is "
            "refused: loading pickled data can run code from the file. A mask "
            "file holds a plain bool or integer array.",
        )
    return _bad(path, f"is not a readable {what}: it does not start with the header of one.")


def _resolve_format(path: Path, format: str | None) -> Format:
    if format is not None:
        if format not in _FORMATS:
            raise _bad(path, f"format={format!r} is not one of {', '.join(_FORMATS)}.")
        return format  # type: ignore[return-value]
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None:
        said = (
            f"cannot tell the format from the suffix {path.suffix!r}; expected one of "
            f"{', '.join(sorted(_SUFFIXES))}"
        )
        raise _bad(
            path,
            f"{said}, or pass format= (one of {', '.join(_FORMATS)}).",
            cli=f"{said}, or give --format (one of {', '.join(_FORMATS)}).",
        )
    return found


def _check_convention(path: Path, convention: str | None) -> None:
    if convention is not None and convention not in _CONVENTIONS:
        meaning = "('keep': nonzero/True = pixel kept; 'masked-nonzero': nonzero = pixel masked)."
        raise _bad(
            path,
            f"convention={convention!r} is not one of {', '.join(map(repr, _CONVENTIONS))} "
            f"{meaning}",
            cli=f"--convention {convention!r} is not one of {', '.join(_CONVENTIONS)} {meaning}",
        )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ readers
# Each returns (raw array as stored, dataset or None, {library: version}).


def _read_npy(path: Path, dataset: str | None) -> tuple[np.ndarray, str | None, dict]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as err:  # numpy raises ValueError, EOFError, OSError, ... by case
        refusal = _refused_by_numpy(path, err, ".npy array")
        if refusal is not None:
            raise refusal from None  # numpy's message advises loading it unsafely
        raise _bad(path, f"is not a readable .npy array ({type(err).__name__}: {err}).") from err
    if not isinstance(loaded, np.ndarray):
        loaded.close()
        raise _bad(
            path,
            "is an .npz archive, not an .npy array; name it .npz or pass format='npz'.",
            cli="is an .npz archive, not an .npy array; name it .npz or give --format npz.",
        )
    return loaded, None, {}


def _read_npz(path: Path, dataset: str | None) -> tuple[np.ndarray, str | None, dict]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if isinstance(archive, np.ndarray):
                raise _bad(
                    path,
                    "is an .npy array, not an .npz archive; name it .npy or pass format='npy'.",
                    cli="is an .npy array, not an .npz archive; name it .npy or give --format npy.",
                )
            keys = list(archive.keys())
            if dataset is None:
                if len(keys) != 1:
                    said = f"holds {len(keys)} arrays ({', '.join(keys) or 'none'}); expected one"
                    raise _bad(
                        path,
                        f"{said}, or pass dataset= naming the mask.",
                        cli=f"{said}, or give --dataset NAME naming the mask.",
                    )
                dataset = keys[0]
            elif dataset not in keys:
                raise _bad(
                    path, f"has no array {dataset!r}; it holds: {', '.join(keys) or 'nothing'}."
                )
            return archive[dataset], dataset, {}
    except MaskValidationError:
        raise
    except Exception as err:  # BadZipFile, EOFError, ValueError, zlib.error, ...
        refusal = _refused_by_numpy(path, err, ".npz archive")
        if refusal is not None:
            raise refusal from None  # numpy's message advises loading it unsafely
        raise _bad(path, f"is not a readable .npz archive ({type(err).__name__}: {err}).") from err


def _read_tiff(path: Path, dataset: str | None) -> tuple[np.ndarray, str | None, dict]:
    import tifffile

    try:
        data = tifffile.imread(path)
    except Exception as err:  # TiffFileError, ValueError on truncation, zlib.error, ...
        raise _bad(path, f"is not a readable TIFF image ({type(err).__name__}: {err}).") from err
    return np.asarray(data), None, {"tifffile": tifffile.__version__}


def _read_fabio(path: Path, fmt: str) -> tuple[np.ndarray, str | None, dict]:
    import fabio
    from fabio.edfimage import EdfImage
    from fabio.fit2dmaskimage import Fit2dMaskImage

    # The reader follows the suffix (or format=), not fabio's content sniffing,
    # so a TIFF renamed .edf is refused instead of read as something else.
    image_class = EdfImage if fmt == "edf" else Fit2dMaskImage
    expected = "an EDF image" if fmt == "edf" else "a Fit2D mask (.msk)"
    try:
        with image_class() as image:
            image.read(str(path))
            frames = getattr(image, "nframes", 1)
            data = np.array(image.data)
            if fmt == "edf":
                # fabio pads a truncated EDF data block with zeros and only logs
                # it; zeros would read as "kept", so check the sizes ourselves.
                needed = int(image.header.get("EDF_HeaderSize", 0)) + int(
                    image.header.get("EDF_BinarySize", image.header.get("Size", 0))
                )
                if frames == 1 and os.path.getsize(path) < needed:
                    raise _bad(
                        path,
                        f"is truncated: {os.path.getsize(path)} bytes, but its "
                        f"header announces {needed}.",
                    )
    except MaskValidationError:
        raise
    except Exception as err:  # fabio raises OSError, Exception, AssertionError by case
        raise _bad(path, f"is not {expected} ({type(err).__name__}: {err}).") from err
    if frames != 1:
        raise _bad(path, f"holds {frames} frames; a mask file must hold one 2-D frame.")
    if data is None or data.ndim == 0:
        raise _bad(path, f"holds no image data; expected {expected}.")
    return data, None, {"fabio": fabio.version}


def _read_nexus(path: Path, dataset: str | None) -> tuple[np.ndarray, str | None, dict]:

    h5py = h5py_with_filters()

    try:
        f = h5py.File(path, "r")
    except Exception as err:  # OSError for non-HDF5 or truncated files
        raise _bad(
            path, f"is not a readable HDF5/NeXus file ({type(err).__name__}: {err})."
        ) from err
    with f:
        if dataset is None:
            if isinstance(f.get(NEXUS_PIXEL_MASK), h5py.Dataset):
                dataset = NEXUS_PIXEL_MASK
            else:
                named: list[str] = []
                f.visititems(
                    lambda key, obj: (
                        named.append("/" + key)
                        if isinstance(obj, h5py.Dataset) and key.rsplit("/", 1)[-1] == "pixel_mask"
                        else None
                    )
                )
                if len(named) > 1:
                    said = f"has several 'pixel_mask' datasets ({', '.join(named)})"
                    raise _bad(
                        path,
                        f"{said}; pass dataset= to pick one.",
                        cli=f"{said}; give --dataset PATH to pick one.",
                    )
                dataset = named[0] if named else None
        node = f.get(dataset) if dataset is not None else None
        if not isinstance(node, h5py.Dataset):
            found: list[str] = []
            f.visititems(
                lambda key, obj: found.append("/" + key) if isinstance(obj, h5py.Dataset) else None
            )
            shown = ", ".join(found[:_MAX_LISTED]) or "none"
            more = f" and {len(found) - _MAX_LISTED} more" if len(found) > _MAX_LISTED else ""
            wanted = (
                f"dataset {dataset!r}"
                if dataset is not None
                else f"{NEXUS_PIXEL_MASK!r} or any dataset named 'pixel_mask'"
            )
            said = f"has no {wanted}. Datasets found: {shown}{more}."
            raise _bad(
                path,
                f"{said} Pass dataset= naming the mask.",
                cli=f"{said} Give --dataset PATH naming the mask.",
            )
        try:
            data = node[()]
        except Exception as err:
            raise _bad(
                path, f"dataset {dataset!r} cannot be read ({type(err).__name__}: {err})."
            ) from err
    return np.asarray(data), dataset, {"h5py": h5py.__version__}


def _read_indices(path: Path, shape: tuple[int, int] | None) -> tuple[np.ndarray, dict]:
    if shape is None:
        raise _bad(
            path,
            "is a list of flat pixel indices; pass shape=(rows, cols) of the detector to read it.",
        )
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise _bad(path, "is not text; expected flat pixel indices, one per line.") from err
    try:
        with warnings.catch_warnings():
            # An empty list is valid (nothing masked); numpy warns about it.
            warnings.simplefilter("ignore", UserWarning)
            values = np.loadtxt(path, dtype=np.float64, ndmin=1) if text.strip() else np.zeros(0)
    except ValueError as err:
        raise _bad(path, f"is not a list of flat pixel indices, one per line ({err}).") from err
    if values.ndim != 1:
        raise _bad(
            path,
            f"has {values.shape[1]} columns; expected one flat pixel index per "
            "line (C order: row * cols + col).",
        )
    # np.savetxt writes floats ('%.18e') by default, so accept integral floats.
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        raise _bad(
            path,
            "holds values that are not whole numbers; expected flat pixel indices, one per line.",
        )
    indices = values.astype(np.int64)
    size = int(np.prod(shape))
    out = (indices < 0) | (indices >= size)
    if out.any():
        raise _bad(
            path,
            f"holds {int(out.sum())} indices outside 0..{size - 1} for shape "
            f"{shape_str(shape)}, e.g. {indices[out][:5].tolist()}; was it written for "
            "another detector?",
        )
    listed = np.zeros(size, dtype=bool)
    listed[indices] = True
    return listed.reshape(shape), {}


def _to_keep(
    raw: np.ndarray, fmt: str, convention: str | None, path: Path
) -> tuple[np.ndarray, str]:
    """The bool keep-mask of a raw array read from ``path``, and the convention used."""
    kind = raw.dtype.kind
    if kind not in "buif":
        raise _bad(
            path,
            f"holds dtype {raw.dtype}; a mask must be bool or 0/1 (or, for "
            "'masked-nonzero', integer) values.",
        )
    if raw.ndim != 2:
        raise _bad(
            path,
            f"holds a {raw.ndim}-D array of shape {shape_str(raw.shape)}; a mask "
            "is one 2-D frame (rows, cols).",
        )
    if kind == "f":
        bad = ~np.isin(raw, (0, 1))
        if bad.any():
            raise _bad(
                path,
                f"holds float values other than 0 and 1, e.g. "
                f"{np.unique(raw[bad])[:5].tolist()}; a mask holds 0/1 only.",
            )
    if convention is None:
        if fmt in _NONZERO_MASKED:
            convention = "masked-nonzero"
        elif kind == "b":
            convention = "keep"
        else:
            said = f"holds {raw.dtype} values, not bool, and {fmt} files have no agreed convention."
            raise _bad(
                path,
                f"{said} Pass convention='keep' (1 = pixel kept, as in "
                "chx_masks) or convention='masked-nonzero' (nonzero = masked, as in "
                "pyFAI).",
                cli=f"{said} Give --convention keep (1 = pixel kept, as in "
                "chx-masks) or --convention masked-nonzero (nonzero = masked, as in "
                "pyFAI).",
            )
    if convention == "masked-nonzero":
        return raw == 0, convention
    if kind != "b":
        bad = ~np.isin(raw, (0, 1))
        if bad.any():
            said = f"holds values other than 0 and 1 (e.g. {np.unique(raw[bad])[:5].tolist()})"
            raise _bad(
                path,
                f"{said}, which convention='keep' cannot read; is it convention='masked-nonzero'?",
                cli=f"{said}, which --convention keep "
                "cannot read; is it --convention masked-nonzero?",
            )
    return raw != 0, convention


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
    masked = ~array
    if fmt in ("npy", "npz", "tiff"):
        out = array if used == "keep" else masked.astype(np.uint8)
        if fmt == "tiff":
            import tifffile

            tifffile.imwrite(path, out, compression="zlib")
        else:
            # A file handle, because np.save/np.savez append their suffix to names.
            with open(path, "wb") as f:
                if fmt == "npy":
                    np.save(f, out)
                else:
                    np.savez_compressed(f, mask=out)
    elif fmt in ("edf", "msk"):
        from fabio.edfimage import EdfImage
        from fabio.fit2dmaskimage import Fit2dMaskImage

        out = (masked if used == "masked-nonzero" else array).astype(np.uint8)
        image_class = EdfImage if fmt == "edf" else Fit2dMaskImage
        image_class(data=out).write(str(path))
    elif fmt == "nexus":
        import h5py

        out = (masked if used == "masked-nonzero" else array).astype(np.uint32)
        with h5py.File(path, "w") as f:
            classes = ("NXentry", "NXinstrument", "NXdetector", "NXcollection")
            group = f
            for key, nx_class in zip(
                NEXUS_PIXEL_MASK.strip("/").split("/")[:-1], classes, strict=True
            ):
                group = group.require_group(key)
                group.attrs["NX_class"] = nx_class
            group.create_dataset("pixel_mask", data=out, compression="gzip")
    else:
        listed = masked if used == "masked-nonzero" else array
        what = "masked" if used == "masked-nonzero" else "kept"
        np.savetxt(
            path,
            np.flatnonzero(listed),
            fmt="%d",
            header=f"chx_masks: flat C-order indices of {what} pixels, shape "
            f"{shape_str(array.shape)}",
        )
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


def _convention_words(format: Format, convention: Convention) -> str:
    """What a file of ``format`` written in ``convention`` means, for people.

    Examples
    --------
    >>> _convention_words("edf", "masked-nonzero")
    'nonzero = masked, as pyFAI and fabio read it'
    >>> _convention_words("indices", "masked-nonzero")
    'lists the masked pixels'
    """
    if format == "indices":
        return f"lists the {'masked' if convention == 'masked-nonzero' else 'kept'} pixels"
    if convention == "masked-nonzero":
        return "nonzero = masked, as pyFAI and fabio read it"
    return "True = kept, as chx-masks reads it"


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
