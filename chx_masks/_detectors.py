"""The detectors every CHX registry knows without being told.

Read by :class:`chx_masks.MaskRegistry`; keys are the image data keys that
ophyd Eiger devices at CHX put in their event documents.
"""

from __future__ import annotations

from types import MappingProxyType

from ._records import DetectorRecord

BUILTIN_DETECTORS: MappingProxyType[str, DetectorRecord] = MappingProxyType(
    {
        record.name: record
        for record in (
            DetectorRecord(
                "eiger4m_single_image",
                (2167, 2070),
                {"model": "Dectris EIGER 4M", "pixel_size_um": 75},
                builtin=True,
            ),
            DetectorRecord(
                "eiger1m_single_image",
                (1065, 1030),
                {"model": "Dectris EIGER 1M", "pixel_size_um": 75},
                builtin=True,
            ),
            DetectorRecord(
                "eiger500K_single_image",
                (514, 1030),
                {"model": "Dectris EIGER 500K", "pixel_size_um": 75},
                builtin=True,
            ),
        )
    }
)
