"""2. peer: MaskingRouter against bluesky-darkframes' DarkSubtraction on the same event pages."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from harness import (
    K4M,
    NAMES_4M,
    SHAPE_4M,
    Fixtures,
    Ratio,
    fmt_s,
    interleaved,
    judged,
    line,
    noop,
    pages_of,
    show,
    split_run,
)


def peer_dark_subtraction(field_name: str) -> tuple[Callable[[str, dict], Any], str]:
    """bluesky-darkframes' DarkSubtraction as a ``(name, doc)`` callback, and what it is."""
    try:
        from bluesky_darkframes import DarkSubtraction

        subtraction = DarkSubtraction(field_name)
        subtraction("start", {"uid": "probe", "time": 0.0})
        origin = "bluesky-darkframes DarkSubtraction (installed package)"
    except Exception as err:  # ImportError or an incompatible event-model
        subtraction = EquivalentDarkSubtraction(field_name)
        origin = (
            "!!! EQUIVALENT of bluesky-darkframes DarkSubtraction written here: the "
            f"package could not be used ({type(err).__name__}: {err}) !!!"
        )

    def peer(name: str, doc: dict) -> None:
        # As in bluesky-darkframes' docs: the router returns the processed
        # document, which the next callback receives.
        name, doc = subtraction(name, doc)
        noop(name, doc)

    return peer, origin


class EquivalentDarkSubtraction:
    """Fallback only: the per-frame work of bluesky-darkframes 0.6 ``DarkSubtraction``.

    Deep-copies each light page, stacks its frames, subtracts the stored dark
    frame and clips at 0, casting back to the frames' dtype.
    """

    def __init__(self, field_name: str, pedestal: int = 100) -> None:
        self.field = field_name
        self.pedestal = pedestal
        self.light = self.dark = None
        self.dark_frame = None

    def __call__(self, name: str, doc: dict) -> tuple[str, dict]:
        import copy

        if name == "descriptor":
            if doc["name"] == "primary":
                self.light = doc["uid"]
            elif doc["name"] == "dark":
                self.dark = doc["uid"]
        elif name == "event_page":
            if doc["descriptor"] == self.dark:
                (self.dark_frame,) = np.asarray(doc["data"][self.field])
                self.dark_frame -= self.pedestal
                np.clip(self.dark_frame, a_min=0, a_max=None, out=self.dark_frame)
            elif doc["descriptor"] == self.light:
                doc = copy.deepcopy(dict(doc))
                light = np.asarray(doc["data"][self.field])
                doc["data"][self.field] = np.clip(
                    light - self.dark_frame, a_min=0, a_max=None
                ).astype(light.dtype)
                doc["data"][f"{self.field}_is_background_subtracted"] = [True]
                doc["timestamps"][f"{self.field}_is_background_subtracted"] = [time.time()]
        return name, doc


def bench_peer(fx: Fixtures, quick: bool) -> list[Ratio]:
    import uuid

    from bluesky_callbacks import MaskingRouter
    from bluesky_callbacks.sim import sim_eiger4m

    n = 6 if quick else 10
    reps = 7 if quick else 21
    reg = fx.registry()
    docs = fx.record(sim_eiger4m(), n, K4M, NAMES_4M, "4m-uint32")
    start, descriptor, events, stop = split_run(docs)
    # DarkSubtraction takes its dark frame from an event in a 'dark' stream.
    dark_descriptor = {**descriptor, "uid": str(uuid.uuid4()), "name": "dark"}
    dark_frame = np.full(SHAPE_4M, 101, dtype=np.uint32)  # 1 count over the pedestal
    dark_page = {
        "uid": [str(uuid.uuid4())],
        "descriptor": dark_descriptor["uid"],
        "seq_num": [1],
        "time": [time.time()],
        "data": {K4M: [dark_frame]},
        "timestamps": {K4M: [time.time()]},
        "filled": {},
    }
    peer, origin = peer_dark_subtraction(K4M)
    print(f"      peer: {origin}", flush=True)
    results = []
    for size in (1, 10):
        pages = pages_of(events, size)
        router = MaskingRouter(reg, noop)
        for name, doc in (("start", start), ("descriptor", descriptor)):
            router(name, doc)
            peer(name, doc)
        peer("descriptor", dark_descriptor)
        peer("event_page", dark_page)

        def run_router(router=router, pages=pages) -> None:
            for page in pages:
                router("event_page", page)

        def run_peer(pages=pages) -> None:
            for page in pages:
                peer("event_page", page)

        med = interleaved({"router": run_router, "peer": run_peer}, reps)
        router("stop", stop)
        peer("stop", stop)
        per_frame = {k: v / n for k, v in med.items()}
        line(
            f"pages of {size:>2}: router {fmt_s(per_frame['router'])}/frame   "
            f"DarkSubtraction {fmt_s(per_frame['peer'])}/frame"
        )
        result = judged(
            "peer",
            f"peer_time/router_time (uint32, pages of {size})",
            per_frame["peer"] / per_frame["router"],
            ">= 1",
            numbers={f"{k}_s_per_frame": v for k, v in per_frame.items()},
            note="" if "EQUIVALENT" not in origin else origin,
        )
        show(result)
        results.append(result)
    return results
