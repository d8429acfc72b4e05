"""The guided tour behind ``chx-masks demo``: the registry doing its everyday work.

Run by the CLI on the default registry (embedded unless configured); safe to
run again: each run adds a version instead of failing on existing names.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._errors import MaskExistsError
from ._registry import MaskRegistry

DETECTOR = "eiger4m_single_image"


def module_gaps(shape: tuple[int, int]) -> np.ndarray:
    """Eiger 4M inter-module gaps: 8 modules high, 2 wide (514x1030 each)."""
    mask = np.ones(shape, dtype=bool)
    for row in range(514, shape[0], 514 + 37):
        mask[row : row + 37, :] = False
    for col in range(1030, shape[1], 1030 + 10):
        mask[:, col : col + 10] = False
    return mask


def beamstop(shape: tuple[int, int], center: tuple[int, int], radius: int) -> np.ndarray:
    """A round beamstop shadow with its arm running to the top edge."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    mask = (rows - center[0]) ** 2 + (cols - center[1]) ** 2 > radius**2
    mask[: center[0], center[1] - 6 : center[1] + 6] = False
    return mask


def hot_pixels(shape: tuple[int, int], seed: int = 7) -> np.ndarray:
    """Hot pixels found in a simulated dark series (mean > 5 sigma)."""
    rng = np.random.default_rng(seed)
    darks = rng.poisson(0.02, size=(10, *shape)).astype(np.uint32)
    hot = rng.choice(darks[0].size, size=150, replace=False)
    darks.reshape(10, -1)[:, hot] += 50
    mean = darks.mean(axis=0)
    return mean <= mean.mean() + 5 * mean.std()


def run_demo(registry: MaskRegistry, echo: Callable[[str], None] = print) -> dict:
    """Register, compose, version, retire and read back masks; report as it goes.

    Examples
    --------
    >>> import tempfile
    >>> with MaskRegistry.embedded(tempfile.mkdtemp()) as reg:
    ...     summary = run_demo(reg, echo=lambda line: None)
    >>> sorted(summary)
    ['composite_sha256', 'masked_fraction', 'registry', 'retired_uid_readable', 'uids']
    """
    shape = registry.get_detector(DETECTOR).shape
    echo(f"registry: {registry.location}")
    masks = {
        "demo_module_gaps": (module_gaps(shape), {"source": "Eiger 4M module geometry"}),
        "demo_beamstop": (
            beamstop(shape, (1100, 1000), 60),
            {"geometry": "circle+arm", "center": [1100, 1000], "radius": 60},
        ),
        "demo_hot_pixels": (hot_pixels(shape), {"source": "dark series", "sigma": 5}),
    }
    uids = {}
    for name, (mask, md) in masks.items():
        md = {**md, "made_by": "chx-masks demo"}
        try:
            uids[name] = registry.register_mask(DETECTOR, name, mask, metadata=md)
            verb = "registered"
        except MaskExistsError:
            uids[name] = registry.update_mask(DETECTOR, name, mask, metadata=md)
            verb = "updated   "
        record = registry.describe(uids[name])
        echo(
            f"{verb} {DETECTOR}/{name:<18} v{record.version:<3} {record.uid}  "
            f"masks {record.masked_fraction:7.3%}"
        )
    echo(f"active masks: {registry.get_masks()}")
    composite = registry.resolve_composite(DETECTOR, list(masks))
    echo("composite:")
    echo("  " + str(composite.explain()).replace("\n", "\n  "))
    lazy = registry.get_composite_mask(DETECTOR, list(masks))
    assert (lazy.compute() == composite.mask).all()
    echo(f"composite sha256 {composite.sha256[:16]}..., lazy dask read agrees")

    scratch = "demo_scratch"
    try:
        uid = registry.register_mask(DETECTOR, scratch, masks["demo_beamstop"][0])
    except MaskExistsError:
        uid = registry.get_mask_uid(DETECTOR, scratch)
    registry.delete_mask(DETECTOR, scratch)
    readable = bool(registry.get_mask_by_uid(uid).compute().shape == shape)
    echo(f"retired {DETECTOR}/{scratch}; its uid {uid} still reads back: {readable}")
    return {
        "registry": registry.location,
        "uids": uids,
        "composite_sha256": composite.sha256,
        "masked_fraction": float((~composite.mask).mean()),
        "retired_uid_readable": readable,
    }
