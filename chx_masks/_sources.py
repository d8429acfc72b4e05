"""Storing a mask together with where it came from; used by :mod:`chx_masks.io` and
:mod:`chx_masks.generate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._errors import MaskValidationError

if TYPE_CHECKING:
    import numpy as np

    from ._registry import MaskRegistry


def register_with_source(
    registry: MaskRegistry,
    detector: str,
    name: str,
    mask: np.ndarray,
    source: Mapping[str, Any],
    *,
    update: bool = False,
    metadata: Mapping[str, Any] | None = None,
    force: bool = False,
) -> str:
    """Register (or, with ``update``, add a version of) a mask with ``metadata["source"]``.

    With ``update`` and no ``metadata``, the previous version's metadata is
    kept and only its ``source`` replaced, as :meth:`MaskRegistry.update_mask`
    keeps metadata. ``force`` is :meth:`MaskRegistry.update_mask`'s: add a
    version identical to the current one.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> from chx_masks import MaskRegistry
    >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
    ...     uid = register_with_source(reg, "eiger500K_single_image", "m",
    ...                                np.ones((514, 1030), bool), {"kind": "test"})
    ...     reg.describe(uid).metadata["source"]
    {'kind': 'test'}
    """
    if metadata is not None and "source" in metadata:
        raise MaskValidationError(
            "metadata may not contain 'source': it records where the mask came "
            "from. Use another key, e.g. 'user_source'."
        )
    if update and metadata is None:
        previous = registry.describe(registry.get_mask_uid(detector, name)).metadata
        metadata = {k: v for k, v in previous.items() if k != "source"}
    full = {**(metadata or {}), "source": dict(source)}
    if update:
        return registry.update_mask(detector, name, mask, metadata=full, force=force)
    return registry.register_mask(detector, name, mask, metadata=full)
