"""Bluesky integration of chx-masks: mask provenance at run start, masked frames live and on replay.

Imports :mod:`chx_masks`; the registry library itself never imports bluesky.
"""

from ._process import (
    LeaseLostError,
    ProcessedRun,
    ProcessingError,
    RunStore,
    plan_processing,
    process_run,
    write_product,
)
from ._provenance import MaskProvenance, mask_provenance_decorator, mask_provenance_wrapper
from ._pychx import ProductFrames
from ._replay import masked_frames, open_run_store, replay_masked, run_composite
from ._router import MaskingRouter
from ._stream import EigerSeriesToStream

__all__ = [
    "EigerSeriesToStream",
    "LeaseLostError",
    "MaskProvenance",
    "MaskingRouter",
    "ProcessedRun",
    "ProcessingError",
    "ProductFrames",
    "RunStore",
    "mask_provenance_decorator",
    "mask_provenance_wrapper",
    "masked_frames",
    "open_run_store",
    "plan_processing",
    "process_run",
    "replay_masked",
    "run_composite",
    "write_product",
]
