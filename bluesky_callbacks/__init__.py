"""Bluesky integration of chx-masks: mask provenance at run start, masked frames live and on replay.

Imports :mod:`chx_masks`; the registry library itself never imports bluesky.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._process import (
        LeaseLostError,
        ProcessedRun,
        ProcessingError,
        ProcessingPlan,
        RunStore,
        StoreUnavailableError,
        plan_processing,
        process_run,
        write_product,
    )
    from ._provenance import MaskProvenance, mask_provenance_decorator, mask_provenance_wrapper
    from ._pychx import ProductFrames
    from ._replay import masked_frames, open_run_store, replay_masked, run_composite
    from ._router import MaskingRouter
    from ._run_masks import (
        DetectorMasks,
        RunMasks,
        RunUse,
        find_run,
        lineage_uids,
        run_masks,
        runs_using,
    )
    from ._stream import EigerSeriesToStream

# Each name's module, imported on first use: `chx-masks` loads this package's
# commands (bluesky_callbacks.commands) without paying for Bluesky itself.
_MODULES = {
    "LeaseLostError": "_process",
    "ProcessedRun": "_process",
    "ProcessingError": "_process",
    "ProcessingPlan": "_process",
    "StoreUnavailableError": "_process",
    "RunStore": "_process",
    "plan_processing": "_process",
    "process_run": "_process",
    "write_product": "_process",
    "MaskProvenance": "_provenance",
    "mask_provenance_decorator": "_provenance",
    "mask_provenance_wrapper": "_provenance",
    "ProductFrames": "_pychx",
    "masked_frames": "_replay",
    "open_run_store": "_replay",
    "replay_masked": "_replay",
    "run_composite": "_replay",
    "MaskingRouter": "_router",
    "DetectorMasks": "_run_masks",
    "RunMasks": "_run_masks",
    "RunUse": "_run_masks",
    "find_run": "_run_masks",
    "lineage_uids": "_run_masks",
    "run_masks": "_run_masks",
    "runs_using": "_run_masks",
    "EigerSeriesToStream": "_stream",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "DetectorMasks",
    "EigerSeriesToStream",
    "LeaseLostError",
    "MaskProvenance",
    "MaskingRouter",
    "ProcessedRun",
    "ProcessingError",
    "ProcessingPlan",
    "ProductFrames",
    "RunMasks",
    "RunStore",
    "RunUse",
    "StoreUnavailableError",
    "find_run",
    "lineage_uids",
    "mask_provenance_decorator",
    "mask_provenance_wrapper",
    "masked_frames",
    "open_run_store",
    "plan_processing",
    "process_run",
    "replay_masked",
    "run_composite",
    "run_masks",
    "runs_using",
    "write_product",
]
