"""6. memory: peak RSS of the live router over a 4M scan, in a fresh process."""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import (
    K4M,
    NAMES_4M,
    RUN_MD,
    SHAPE_4M,
    Fixtures,
    MiB,
    Ratio,
    judged,
    line,
    proc_status,
    run_child,
    show,
)


def child_memory(directory: str, masks_json: str, n: str) -> None:
    """In a fresh process: peak RSS of a MaskingRouter over an n-frame 4M scan."""
    import uuid

    from event_model import compose_run

    from bluesky_callbacks import MaskingRouter
    from bluesky_callbacks.sim import EigerPattern
    from chx_masks import MaskRegistry

    frames = int(n)
    record = json.loads(masks_json)
    reg = MaskRegistry.embedded(directory)
    pattern = EigerPattern(SHAPE_4M)
    pattern.frame(0)  # the generator's own base pattern is not the router's memory
    emitted = [0]

    def count_frames(name: str, doc: dict) -> None:  # keeps nothing, like noop
        if name == "event_page":
            emitted[0] += len(doc["data"].get(K4M, ()))

    router = MaskingRouter(reg, count_frames)
    bundle = compose_run(metadata={"masks": {K4M: record}, "mask_uids": record["uids"]})
    descriptor = bundle.compose_descriptor(
        name="primary",
        data_keys={
            K4M: {"source": "SIM", "dtype": "array", "shape": list(SHAPE_4M), "dtype_numpy": "<u4"}
        },
    ).descriptor_doc

    def page(i: int) -> dict:
        now = time.time()
        return {
            "uid": [str(uuid.uuid4())],
            "descriptor": descriptor["uid"],
            "seq_num": [i + 1],
            "time": [now],
            "data": {K4M: [pattern.frame(i)]},
            "timestamps": {K4M: [now]},
            "filled": {},
        }

    gc.collect()
    baseline = proc_status("VmRSS")
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        reset = False
    router("start", bundle.start_doc)
    router("descriptor", descriptor)
    after_start = proc_status("VmRSS")
    for i in range(frames):
        doc = page(i)
        router("event_page", doc)
        del doc
    router(
        "stop",
        {
            "uid": str(uuid.uuid4()),
            "time": time.time(),
            "run_start": bundle.start_doc["uid"],
            "exit_status": "success",
        },
    )
    peak = proc_status("VmHWM")
    reg.close()
    print(
        json.dumps(
            {
                "baseline": baseline,
                "after_start": after_start,
                "peak": peak,
                "hwm_reset": reset,
                "emitted": emitted[0],
            }
        )
    )


def bench_memory(fx: Fixtures, quick: bool) -> list[Ratio]:
    from bluesky_callbacks import MaskProvenance

    frames = 50 if quick else 500
    reg = fx.registry()
    record = MaskProvenance(reg, masks={K4M: NAMES_4M}).start_metadata(RUN_MD)["masks"][K4M]
    record = {k: record[k] for k in ("names", "uids", "versions", "sha256")}
    frame_bytes = int(np.prod(SHAPE_4M)) * 4
    composite_bytes = int(np.prod(SHAPE_4M))  # bool: one byte a pixel
    budget = 3 * frame_bytes + composite_bytes
    # First with no local copies of the masks (read through tiled), then again
    # with the copies that first process left (see run_start).
    cache = Path(tempfile.mkdtemp(dir=fx.root))
    results = []
    for which in ("first read", "local copies"):
        got = run_child(
            "memory", str(fx.registry_dir()), json.dumps(record), str(frames), mask_cache=cache
        )
        if got["emitted"] != frames:
            raise AssertionError(f"the router emitted {got['emitted']} of {frames} masked frames")
        extra = got["peak"] - got["baseline"]
        masks_part = got["after_start"] - got["baseline"]
        line(
            f"{which}: {frames} frames of {frame_bytes / MiB:.1f} MiB, pages of 1: baseline "
            f"RSS {got['baseline'] / MiB:.0f} MiB; after the start document "
            f"+{masks_part / MiB:.1f} MiB; peak +{extra / MiB:.1f} MiB; budget 3 frames + "
            f"composite = {budget / MiB:.1f} MiB"
            + ("" if got["hwm_reset"] else " (VmHWM not reset: upper bound)")
        )
        results.append(
            judged(
                "memory",
                f"extra peak RSS / (3 frames + composite), {which}",
                extra / budget,
                "<= 1",
                numbers={
                    "extra_bytes": extra,
                    "budget_bytes": budget,
                    "after_start_bytes": masks_part,
                    "frames": frames,
                },
            )
        )
        show(results[-1])
    return results
