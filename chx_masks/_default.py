"""The process-wide default registry and the seed functions bound to it.

Used by beamline users (``from chx_masks import register_mask``) and the
IPython profile. Resolution order: an explicit :func:`set_default_registry`
> ``CHX_MASKS_URI`` (+ ``CHX_MASKS_API_KEY``) or ``CHX_MASKS_PROFILE`` > an
embedded registry in ``CHX_MASKS_DIR`` or the user data directory.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._records import MaskRecord
from ._registry import MaskRegistry

if TYPE_CHECKING:
    import dask.array

    from ._content import TimeLike

_lock = threading.Lock()
_default: MaskRegistry | None = None
_owned = False


def default_registry() -> MaskRegistry:
    """The registry the module-level functions use, opened on first call.

    Examples
    --------
    >>> import os, tempfile
    >>> os.environ["CHX_MASKS_DIR"] = tempfile.mkdtemp()
    >>> set_default_registry(None)
    >>> default_registry()  # doctest: +ELLIPSIS
    <MaskRegistry at /tmp/...>
    >>> set_default_registry(None); del os.environ["CHX_MASKS_DIR"]
    """
    global _default, _owned
    with _lock:
        if _default is None:
            _default = _from_environment()
            _owned = True
        return _default


def opened_default() -> MaskRegistry | None:
    """The default registry if this process has chosen or opened it, else None.

    Examples
    --------
    >>> set_default_registry(None)
    >>> opened_default() is None
    True
    """
    with _lock:
        return _default


def set_default_registry(
    registry: MaskRegistry | str | Path | None, *, api_key: str | None = None
) -> None:
    """Choose the default registry explicitly (this beats the environment).

    Parameters
    ----------
    registry : MaskRegistry, str, Path or None
        A registry; a tiled URI (``http://...``); a directory for an
        embedded registry; or None to forget the choice (the next call to
        :func:`default_registry` reads the environment again).
    api_key : str, optional
        With a URI, the tiled API key.

    Examples
    --------
    >>> import tempfile
    >>> set_default_registry(tempfile.mkdtemp())
    >>> set_default_registry(None)
    """
    global _default, _owned
    new: MaskRegistry | None
    if isinstance(registry, str) and registry.startswith(("http://", "https://")):
        new, owned = MaskRegistry.from_uri(registry, api_key=api_key), True
    elif isinstance(registry, (str, Path)):
        new, owned = MaskRegistry.embedded(registry), True
    else:
        new, owned = registry, False
    with _lock:
        old, old_owned = _default, _owned
        _default, _owned = new, owned
    if old is not None and old_owned and old is not new:
        old.close()


def _from_environment() -> MaskRegistry:
    from .settings import settings

    configured = settings()
    if configured.uri:
        return MaskRegistry.from_uri(configured.uri, api_key=configured.secret("api_key"))
    if configured.profile:
        return MaskRegistry.from_profile(configured.profile)
    return MaskRegistry.embedded()


@atexit.register
def _close_default() -> None:
    set_default_registry(None)


def register_mask(
    detector: str,
    name: str,
    mask: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    allow_binary: bool = False,
) -> str:
    """Register a new mask lineage in the default registry; return its uid.

    See :meth:`MaskRegistry.register_mask`.

    Examples
    --------
    >>> import numpy as np
    >>> mask = np.ones((2167, 2070), dtype=bool)
    >>> register_mask('eiger4m_single_image', 'chip_mask', mask)  # doctest: +SKIP
    '73f07be0-d535-41db-9258-2dd01e1ac37b'
    """
    return default_registry().register_mask(
        detector, name, mask, metadata=metadata, allow_binary=allow_binary
    )


def get_masks() -> list[tuple[str, str]]:
    """``[(detector, name), ...]`` of every active mask in the default registry.

    Examples
    --------
    >>> get_masks()  # doctest: +SKIP
    [('eiger4m_single_image', 'pixel_mask'), ('eiger4m_single_image', 'chip_mask')]
    """
    return default_registry().get_masks()


def get_mask(
    detector: str, name: str, *, version: int | None = None, as_of: TimeLike | None = None
) -> dask.array.Array:
    """A mask of the default registry as a dask array (``.compute()`` -> NumPy).

    Examples
    --------
    >>> mask = get_mask('eiger4m_single_image', 'chip_mask').compute()  # doctest: +SKIP
    """
    return default_registry().get_mask(detector, name, version=version, as_of=as_of)


def get_composite_mask(
    detector: str, names: Sequence[str], *, as_of: TimeLike | None = None
) -> dask.array.Array:
    """The AND of several masks of the default registry, as a dask array.

    Examples
    --------
    >>> names = ['chip_mask', 'bad_pixels']
    >>> get_composite_mask('eiger4m_single_image', names)  # doctest: +SKIP
    dask.array<and_, shape=(2167, 2070), dtype=bool, chunksize=(2167, 2070), ...>
    """
    return default_registry().get_composite_mask(detector, names, as_of=as_of)


def get_mask_uid(
    detector: str, name: str, *, version: int | None = None, as_of: TimeLike | None = None
) -> str:
    """The uid of a mask in the default registry.

    Examples
    --------
    >>> get_mask_uid('eiger4m_single_image', 'chip_mask')  # doctest: +SKIP
    '73f07be0-d535-41db-9258-2dd01e1ac37b'
    """
    return default_registry().get_mask_uid(detector, name, version=version, as_of=as_of)


def delete_mask(detector: str, name: str) -> MaskRecord:
    """Retire a mask lineage in the default registry (its uids stay readable).

    Examples
    --------
    >>> delete_mask('eiger4m_single_image', 'chip_mask')  # doctest: +SKIP
    """
    return default_registry().delete_mask(detector, name)
