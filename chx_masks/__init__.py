"""chx-masks: a versioned, provenance-safe registry of detector masks on tiled.

A mask is a 2-D NumPy bool array of exactly the detector's shape; True keeps a
pixel, False masks it. Every registered version has a uid that resolves
forever.

Examples
--------
>>> from chx_masks import register_mask, get_masks, get_mask  # doctest: +SKIP
>>> register_mask('eiger4m_single_image', 'chip_mask', mask)  # doctest: +SKIP
"""

from ._content import TimeLike, mask_sha256
from ._default import (
    default_registry,
    delete_mask,
    get_composite_mask,
    get_mask,
    get_mask_uid,
    get_masks,
    register_mask,
    set_default_registry,
)
from ._detectors import BUILTIN_DETECTORS
from ._diff import MaskDiff
from ._errors import (
    ChxMasksError,
    DetectorNotFoundError,
    FrameShapeError,
    MaskExistsError,
    MaskIntegrityError,
    MaskInUseError,
    MaskNotFoundError,
    MaskPermissionError,
    MaskPurgedError,
    MaskValidationError,
    RegistryUnavailableError,
    SettingsError,
)
from ._records import (
    ActiveSet,
    ComponentExplanation,
    CompositeMask,
    DetectorRecord,
    Explanation,
    MaskRecord,
)
from ._registry import MaskRegistry
from ._version import __version__

__all__ = [
    "ActiveSet",
    "BUILTIN_DETECTORS",
    "ChxMasksError",
    "ComponentExplanation",
    "CompositeMask",
    "DetectorNotFoundError",
    "DetectorRecord",
    "Explanation",
    "FrameShapeError",
    "MaskDiff",
    "MaskExistsError",
    "MaskInUseError",
    "MaskIntegrityError",
    "MaskNotFoundError",
    "MaskPermissionError",
    "MaskPurgedError",
    "MaskRecord",
    "MaskRegistry",
    "MaskValidationError",
    "RegistryUnavailableError",
    "SettingsError",
    "TimeLike",
    "__version__",
    "default_registry",
    "delete_mask",
    "get_composite_mask",
    "get_mask",
    "get_mask_uid",
    "get_masks",
    "mask_sha256",
    "register_mask",
    "set_default_registry",
]
