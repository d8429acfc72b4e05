"""Exceptions raised by the mask registry; used by every caller of ``chx_masks``.

One root, :class:`ChxMasksError`; each specific error also inherits the
builtin it resembles, so ``except KeyError`` or ``except ValueError`` keeps
working in code that predates this package::

    ChxMasksError(Exception)
    ├── MaskNotFoundError(ChxMasksError, KeyError)
    │   └── DetectorNotFoundError(MaskNotFoundError)
    ├── MaskExistsError(ChxMasksError, ValueError)
    ├── MaskValidationError(ChxMasksError, ValueError)
    ├── MaskIntegrityError(ChxMasksError, RuntimeError)
    ├── RegistryUnavailableError(ChxMasksError, ConnectionError)
    └── MaskPermissionError(ChxMasksError, PermissionError)

A call that raises any of these has written nothing to the registry.
"""

from __future__ import annotations

__all__ = [
    "ChxMasksError",
    "DetectorNotFoundError",
    "MaskExistsError",
    "MaskIntegrityError",
    "MaskNotFoundError",
    "MaskPermissionError",
    "MaskValidationError",
    "RegistryUnavailableError",
]


class ChxMasksError(Exception):
    """Root of every error raised by chx-masks."""


class MaskNotFoundError(ChxMasksError, KeyError):
    """No mask matches the detector, name, version, time or uid asked for."""

    # KeyError's __str__ shows the repr of its argument (quotes and escaped
    # newlines); these messages are sentences meant to be read as written.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DetectorNotFoundError(MaskNotFoundError):
    """The detector is neither built in nor registered."""


class MaskExistsError(ChxMasksError, ValueError):
    """A mask lineage (or detector) of that name is already registered."""


class MaskValidationError(ChxMasksError, ValueError):
    """The mask, name, metadata or query is not acceptable."""


class MaskIntegrityError(ChxMasksError, RuntimeError):
    """The stored bytes of a mask no longer match the sha256 recorded for it."""


class RegistryUnavailableError(ChxMasksError, ConnectionError):
    """The tiled server behind the registry cannot be reached."""


class MaskPermissionError(ChxMasksError, PermissionError):
    """The credentials in use do not allow this operation."""
