"""Exceptions raised by the mask registry; used by every caller of ``chx_masks``.

One root, :class:`ChxMasksError`; each specific error also inherits the
builtin it resembles, so ``except KeyError`` or ``except ValueError`` keeps
working in code that predates this package::

    ChxMasksError(Exception)
    ├── MaskNotFoundError(ChxMasksError, KeyError)
    │   └── DetectorNotFoundError(MaskNotFoundError)
    ├── MaskExistsError(ChxMasksError, ValueError)
    ├── MaskInUseError(ChxMasksError, ValueError)
    ├── MaskValidationError(ChxMasksError, ValueError)
    ├── MaskIntegrityError(ChxMasksError, RuntimeError)
    ├── RegistryUnavailableError(ChxMasksError, ConnectionError)
    ├── MaskPermissionError(ChxMasksError, PermissionError)
    └── SettingsError(ChxMasksError, ValueError)

A call that raises any of these has written nothing to the registry.

Messages speak Python (``update_mask(...)``). Where the fix reads
differently on the command line, the error also carries it as ``cli``
(``chx-masks update DET NAME FILE``); the ``chx-masks`` command prints
:attr:`ChxMasksError.cli_message`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "ChxMasksError",
    "DetectorNotFoundError",
    "FrameShapeError",
    "MaskExistsError",
    "MaskInUseError",
    "MaskIntegrityError",
    "MaskNotFoundError",
    "MaskPermissionError",
    "MaskPurgedError",
    "MaskValidationError",
    "RegistryUnavailableError",
    "SettingsError",
]


class ChxMasksError(Exception):
    """Root of every error raised by chx-masks.

    Parameters
    ----------
    *args
        The message (a sentence: what was wrong, the value, the fix).
    cli : str, optional
        The same message in the command line's words (its commands and
        flags), where they differ from Python's.

    Examples
    --------
    >>> err = ChxMasksError("Use update_mask('d', 'n', mask).",
    ...                     cli="Use `chx-masks update d n FILE`.")
    >>> str(err), err.cli_message
    ("Use update_mask('d', 'n', mask).", 'Use `chx-masks update d n FILE`.')
    >>> ChxMasksError("No such mask.").cli_message
    'No such mask.'
    """

    def __init__(self, *args: object, cli: str | None = None) -> None:
        super().__init__(*args)
        self.cli = cli

    @property
    def cli_message(self) -> str:
        """The message as the ``chx-masks`` command shows it."""
        return self.cli if self.cli is not None else str(self)


class MaskNotFoundError(ChxMasksError, KeyError):
    """No mask matches the detector, name, version, time or uid asked for."""

    # KeyError's __str__ shows the repr of its argument (quotes and escaped
    # newlines); these messages are sentences meant to be read as written.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MaskPurgedError(MaskNotFoundError):
    """The mask was purged by an admin: its bytes are gone; the change log says why.

    ``purge`` holds the change-log entry (``at``, ``by``, ``reason``, ``sha256``).
    """

    def __init__(
        self, *args: object, purge: Mapping[str, Any] | None = None, cli: str | None = None
    ) -> None:
        super().__init__(*args, cli=cli)
        self.purge = dict(purge or {})


class DetectorNotFoundError(MaskNotFoundError):
    """The detector is neither built in nor registered."""


class MaskExistsError(ChxMasksError, ValueError):
    """A mask lineage (or detector) of that name is already registered."""


class MaskInUseError(ChxMasksError, ValueError):
    """The mask is named by an active set, so retiring it would break the next runs."""


class MaskValidationError(ChxMasksError, ValueError):
    """The mask, name, metadata or query is not acceptable."""


class FrameShapeError(MaskValidationError):
    """Frames and the mask applied to them differ in shape (another detector's mask).

    Raised wherever a mask meets frames: live masking, replay, end-of-run
    processing and pictures of a frame.
    """


class MaskIntegrityError(ChxMasksError, RuntimeError):
    """The stored bytes of a mask no longer match the sha256 recorded for it."""


class RegistryUnavailableError(ChxMasksError, ConnectionError):
    """The tiled server behind the registry cannot be reached."""


class MaskPermissionError(ChxMasksError, PermissionError):
    """The credentials in use do not allow this operation."""


class SettingsError(ChxMasksError, ValueError):
    """A ``CHX_MASKS_*`` environment variable holds a value that cannot be read."""
