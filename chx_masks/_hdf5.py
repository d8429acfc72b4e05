"""h5py with the compression filters of DECTRIS Eiger files; for every direct reader of HDF5.

Used by :mod:`chx_masks.io`, the command line and the Bluesky integration
wherever they open detector or mask files themselves (tiled's own HDF5
adapter, which serves files on replay, loads the filters by itself).
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["h5py_with_filters"]


def h5py_with_filters() -> ModuleType:
    """The ``h5py`` module, with hdf5plugin's filters registered in this process.

    Eiger data files (and often the master file's ``pixel_mask``) are
    compressed with bitshuffle-LZ4, HDF5 filter 32008, which HDF5 does not
    ship: h5py reads such a dataset only after ``hdf5plugin`` has been
    imported in the process. Importing it here, next to every read, makes
    compressed files read in any fresh process, whatever was imported first.

    Examples
    --------
    >>> import numpy as np, tempfile, os, hdf5plugin
    >>> h5py = h5py_with_filters()
    >>> path = os.path.join(tempfile.mkdtemp(), "frames.h5")
    >>> with h5py.File(path, "w") as f:
    ...     _ = f.create_dataset("data", data=np.arange(12, dtype=np.uint32).reshape(3, 4),
    ...                          chunks=(1, 4), **hdf5plugin.Bitshuffle(cname="lz4"))
    >>> with h5py.File(path, "r") as f:
    ...     int(f["data"][2, 3]), f["data"].id.get_create_plist().get_filter(0)[0]
    (11, 32008)
    """
    import h5py
    import hdf5plugin  # noqa: F401  (importing it registers the filters with HDF5)

    return h5py
