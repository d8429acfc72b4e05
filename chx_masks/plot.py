"""PNG pictures of masks, composites and detector frames (the ``plot`` extra).

What ``chx-masks ... --png``, the demo and the IPython profile draw with;
matplotlib is imported only when a picture is drawn.

Examples
--------
>>> import numpy as np, tempfile, os
>>> from chx_masks.plot import mask_png
>>> mask = np.ones((64, 48), dtype=bool); mask[:4] = False
>>> path = mask_png(mask, os.path.join(tempfile.mkdtemp(), "m.png"), title="gap")
>>> path.suffix, path.stat().st_size > 0
('.png', True)
"""

from __future__ import annotations

from ._plot import composite_png, frame_png, mask_png, record_title

__all__ = ["composite_png", "frame_png", "mask_png", "record_title"]
