"""Bluesky integration of chx-masks: mask provenance at run start, masked frames live and on replay.

Imports :mod:`chx_masks`; the registry library itself never imports bluesky.
"""

from ._provenance import MaskProvenance, mask_provenance_decorator, mask_provenance_wrapper
from ._replay import masked_frames, open_run_store, replay_masked, run_composite
from ._router import MaskingRouter

__all__ = [
    "MaskProvenance",
    "MaskingRouter",
    "mask_provenance_decorator",
    "mask_provenance_wrapper",
    "masked_frames",
    "open_run_store",
    "replay_masked",
    "run_composite",
]
