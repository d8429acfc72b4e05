"""The private parts of :mod:`bluesky_callbacks.profile`: printed tables, log lines, the
registry opener the callbacks share, the masked-run writer, and the check of active names.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chx_masks import MaskRegistry

    from .profile import ProfileMasks


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print aligned columns."""
    cells_of = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells_of]) for i, h in enumerate(headers)]
    for cells in [list(headers), *cells_of]:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())


def _log_lines() -> None:
    """One "chx-masks: ..." line on stderr per warning of the run callbacks.

    Only where nothing else handles logging (Python would print the bare
    message); a profile that configures logging keeps its own handlers.
    """
    import logging

    if logging.getLogger().handlers:
        return
    log = logging.getLogger("bluesky_callbacks")
    if any(getattr(h, "_chx_masks", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("chx-masks: %(message)s"))
    handler._chx_masks = True  # type: ignore[attr-defined]
    log.addHandler(handler)


class _Opener:
    """The registry factory the callbacks share; its ``location`` names it in their messages."""

    def __init__(self, masks: ProfileMasks) -> None:
        self._masks = masks

    def __call__(self) -> MaskRegistry:
        return self._masks.open_registry()

    @property
    def location(self) -> str:
        return self._masks.location


def _missing_flag(
    registry: MaskRegistry, detector: str, names: list[str], source: str
) -> str | None:
    """The line that flags names which are not current registered masks, with the fix."""
    import chx_masks

    if not names:
        return None
    try:
        missing = registry.missing_names(detector, names)
    except chx_masks.ChxMasksError as err:  # e.g. a detector the registry does not know
        return f"! {detector}: its masks cannot be checked: {err}"
    if not missing:
        return None
    keep = [n for n in names if n not in missing]
    one = len(missing) == 1
    if keep:
        fix = f"masks_activate({detector!r}, {keep!r}) without {'it' if one else 'them'}"
    elif source == "CHX_MASKS_FALLBACK":
        fix = f"masks_activate({detector!r}, [registered names])"
    else:
        fix = f"masks_activate({detector!r}, []) to fall back to CHX_MASKS_FALLBACK"
    return (
        f"! {detector}: {', '.join(missing)} ({source}) "
        f"{'is not a registered mask' if one else 'are not registered masks'} "
        "(never registered, or retired): a run with this detector opens without "
        f"its masks. Register {'it' if one else 'them'} with mask_register(...), "
        f"or {fix}."
    )


def _masked_run_writer(open_runs: Callable[[], Any]) -> Callable[[str, dict], None]:
    """The router's downstream: TiledWriter into the runs store, ``open_runs()`` at first use."""
    writer: dict[str, Any] = {"open": None, "skip": False}

    def write_masked_run(name: str, doc: dict) -> None:
        # TiledWriter and its store are opened at the first masked run,
        # not at IPython start; a store that cannot be opened skips that
        # run (one line) and is tried again at the next one.
        if name == "start":
            # A run that uses no masked detector has nothing to store.
            writer["skip"] = not doc.get("masks")
            if writer["open"] is None and not writer["skip"]:
                try:
                    from bluesky_tiled_plugins import TiledWriter

                    writer["open"] = TiledWriter(open_runs())
                except Exception as err:
                    writer["skip"] = True
                    print(
                        f"chx-masks: the masked run of {doc.get('parent_uid')} is not "
                        f"stored: cannot open the runs store ({type(err).__name__}: "
                        f"{err})",
                        file=sys.stderr,
                    )
                    return
        if writer["open"] is not None and not writer["skip"]:
            writer["open"](name, doc)

    return write_masked_run
