"""Readers and writers of each mask file format, and the checks around them.

Private to :mod:`chx_masks.io` (which re-exports what is public) and the command line.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

from ._content import shape_str
from ._errors import MaskValidationError
from ._hdf5 import h5py_with_filters

Format = Literal["npy", "npz", "tiff", "edf", "msk", "nexus", "indices"]
Convention = Literal["keep", "masked-nonzero"]

#: Where Eiger master files (and :func:`chx_masks.io.write_mask`) keep the detector's own mask.
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


def _write_file(array: np.ndarray, path: Path, fmt: Format, used: str) -> None:
    """Write the keep-mask ``array`` to ``path`` as ``fmt`` in the convention ``used``."""
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
