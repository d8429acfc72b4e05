"""1. live: MaskingRouter on Eiger 4M event pages and on DECTRIS HDF5 files.

Baselines: np.copyto into a buffer (the floor) and ``frame * mask``; h5py alone for HDF5.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from harness import (
    K4M,
    NAMES_4M,
    SHAPE_4M,
    Fixtures,
    MiB,
    Ratio,
    interleaved,
    judged,
    line,
    noop,
    pages_of,
    show,
    split_run,
)


def bench_live(fx: Fixtures, quick: bool, profile: bool) -> list[Ratio]:
    from bluesky_callbacks import MaskingRouter
    from bluesky_callbacks.sim import sim_eiger4m

    n = 6 if quick else 10
    reps = 7 if quick else 21
    reg = fx.registry()
    results: list[Ratio] = []
    for dtype, judge in ((np.uint32, True), (np.uint16, False)):
        docs = fx.record(sim_eiger4m(dtype=dtype), n, K4M, NAMES_4M, f"4m-{np.dtype(dtype).name}")
        start, descriptor, events, stop = split_run(docs)
        frames = [ev["data"][K4M] for ev in events]
        mask = reg.resolve_composite(K4M, NAMES_4M).mask  # the same composite, bool
        buf = np.empty_like(frames[0])
        check_router_output(reg, docs, frames, mask)
        line(
            f"{np.dtype(dtype).name}: {n} frames {frames[0].shape}, "
            f"{frames[0].nbytes / MiB:.1f} MiB each"
        )
        for size in (1, 10):
            pages = pages_of(events, size)
            router = MaskingRouter(reg, noop)
            router("start", start)
            router("descriptor", descriptor)

            def run_router(router=router, pages=pages) -> None:
                for page in pages:
                    router("event_page", page)

            def floor(frames=frames, buf=buf) -> None:
                for frame in frames:
                    np.copyto(buf, frame)

            def naive(frames=frames, mask=mask) -> None:
                for frame in frames:
                    frame * mask  # noqa: B018 - the naive masking itself is the work

            if profile and judge and size == 1:
                profile_router(run_router)
            med = interleaved({"router": run_router, "floor": floor, "naive": naive}, reps)
            router("stop", stop)
            fps = {k: n / v for k, v in med.items()}
            numbers = {f"{k}_frames_per_s": round(v, 1) for k, v in fps.items()}
            line(
                f"pages of {size:>2}: router {fps['router']:7.1f} fr/s   "
                f"floor (np.copyto) {fps['floor']:7.1f} fr/s   "
                f"naive (frame * bool) {fps['naive']:7.1f} fr/s"
            )
            what = f"{np.dtype(dtype).name}, pages of {size}"
            results.append(
                judged(
                    "live",
                    f"router/floor ({what})",
                    fps["router"] / fps["floor"],
                    ">= 0.5" if judge else None,
                    numbers=numbers,
                )
            )
            results.append(
                judged(
                    "live",
                    f"router/naive ({what})",
                    fps["router"] / fps["naive"],
                    ">= 1.4" if judge else None,
                    numbers=numbers,
                )
            )
            show(results[-2])
            show(results[-1])
    results.extend(bench_live_hdf5(fx, quick))
    return results


def check_router_output(reg: Any, docs: list, frames: list, mask: np.ndarray) -> None:
    """The contenders compute the same thing: the router's frames equal frame * mask."""
    from bluesky_callbacks import MaskingRouter

    got: list[np.ndarray] = []

    def keep(name: str, doc: dict) -> None:
        if name == "event_page":
            got.extend(np.asarray(f) for f in doc["data"][K4M])

    router = MaskingRouter(reg, keep)
    for name, doc in docs:
        router(name, doc)
    if len(got) != len(frames) or not all(
        np.array_equal(g, f * mask) and g.dtype == f.dtype for g, f in zip(got, frames, strict=True)
    ):
        raise AssertionError("MaskingRouter's frames differ from frame * mask: not comparable.")


def profile_router(run_router: Callable[[], None]) -> None:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(10):
        run_router()
    profiler.disable()
    print("      cProfile of the router, pages of 1 (10 passes), by own time:")
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(12)


def bench_live_hdf5(fx: Fixtures, quick: bool) -> list[Ratio]:
    """Eiger 4M DECTRIS files (bitshuffle-LZ4, XPCS at 0.05 photons/pixel) read by the router.

    The ophyd-async simulated Eiger writes what the CHX Eigers write; the
    router reads each StreamDatum's frames from the data file, decodes and
    masks them. Side by side: h5py reading the same frames alone (decoding
    is this path's floor on one core) and h5py read then ``frame * bool``.
    """
    from urllib.parse import urlsplit

    from bluesky.plans import count
    from ophyd_async.plan_stubs import ensure_connected

    from bluesky_callbacks import MaskingRouter, MaskProvenance
    from bluesky_callbacks.sim import SimAsyncEiger
    from chx_masks._hdf5 import h5py_with_filters

    h5py = h5py_with_filters()
    n = 6 if quick else 20
    reps = 5 if quick else 9
    reg = fx.registry()
    RE = fx.run_engine()
    det = SimAsyncEiger("eiger4m_single", fx.root / "hdf5", mean=0.05)
    RE(ensure_connected(det))
    docs: list[tuple[str, dict]] = []
    RE.preprocessors[:] = [MaskProvenance(reg, masks={K4M: NAMES_4M})]
    token = RE.subscribe(lambda name, doc: docs.append((name, doc)))
    try:
        RE(count([det], num=n))
    finally:
        RE.unsubscribe(token)
        RE.preprocessors[:] = []
    head = [(nm, d) for nm, d in docs if nm in ("start", "descriptor", "stream_resource")]
    datums = [d for nm, d in docs if nm == "stream_datum"]
    stop = next(d for nm, d in docs if nm == "stop")
    resource = next(d for nm, d in docs if nm == "stream_resource")
    mask = reg.resolve_composite(K4M, NAMES_4M).mask
    handle = h5py.File(urlsplit(resource["uri"]).path, "r", swmr=True, libver="latest")
    dataset = handle[resource["parameters"]["dataset"]]
    buf = np.empty((1, *SHAPE_4M), dtype=dataset.dtype)
    # One router per number of decode threads (fixed when a run starts): 1 reads
    # through h5py on the calling thread; more decode raw chunks on threads.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    counts = sorted({1, 2, *(2**k for k in range(2, 4) if 2**k <= cores), min(cores, 8)})
    routers = {}
    before = os.environ.get("CHX_MASKS_DECODE_THREADS")
    try:
        for threads in counts:
            os.environ["CHX_MASKS_DECODE_THREADS"] = str(threads)
            routers[threads] = MaskingRouter(reg, noop)
            for name, doc in head:
                routers[threads](name, doc)
    finally:
        if before is None:
            os.environ.pop("CHX_MASKS_DECODE_THREADS", None)
        else:
            os.environ["CHX_MASKS_DECODE_THREADS"] = before

    def run_router(router: MaskingRouter) -> None:
        for datum in datums:
            router("stream_datum", datum)
        router.flush()

    def floor() -> None:
        for i in range(n):
            dataset.read_direct(buf, np.s_[i : i + 1])

    def naive() -> None:
        for i in range(n):
            dataset[i : i + 1] * mask  # noqa: B018 - the naive read-and-mask is the work

    contenders: dict[str, Callable[[], Any]] = {
        f"router x{t}": functools.partial(run_router, r) for t, r in routers.items()
    }
    try:
        med = interleaved({**contenders, "floor": floor, "naive": naive}, reps)
    finally:
        for router in routers.values():
            router("stop", stop)
        handle.close()
    fps = {k: n / v for k, v in med.items()}
    fps["router"] = fps["router x1"]
    stored = Path(urlsplit(resource["uri"]).path).stat().st_size / n
    shrink = np.dtype(np.uint32).itemsize * SHAPE_4M[0] * SHAPE_4M[1] / stored
    line(
        f"Eiger 4M bitshuffle-LZ4 DECTRIS files, XPCS 0.05 photons/pixel ({len(datums)} "
        f"datums, {stored / 1e6:.2f} MB per frame stored, {shrink:.0f}x smaller): router "
        f"{fps['router']:.1f} fr/s   floor (h5py read_direct) {fps['floor']:.1f} fr/s   "
        f"naive (h5py read * bool) {fps['naive']:.1f} fr/s"
    )
    line(
        "router with decode threads: "
        + "   ".join(f"x{t} {fps[f'router x{t}']:.1f} fr/s" for t in routers)
    )
    numbers = {f"{k.replace(' ', '_')}_frames_per_s": round(v, 1) for k, v in fps.items()}
    numbers["compression_ratio"] = round(shrink, 1)
    results = [
        judged(
            "live",
            "router 1 thread / h5py alone (4M bitshuffle-LZ4, 0.05 ph/px)",
            fps["router x1"] / fps["floor"],
            ">= 0.9",
            numbers=numbers,
        ),
        judged(
            "live",
            "router 2 threads / h5py alone (4M bitshuffle-LZ4, 0.05 ph/px)",
            fps["router x2"] / fps["floor"],
            ">= 1.6",
            numbers=numbers,
        ),
        judged(
            "live",
            "router/naive (uint32 Eiger 4M bitshuffle-LZ4, 0.05 ph/px)",
            fps["router"] / fps["naive"],
            None,
            numbers=numbers,
        ),
    ]
    results.extend(
        judged(
            "live",
            f"router {t} threads / h5py alone (4M bitshuffle-LZ4, 0.05 ph/px)",
            fps[f"router x{t}"] / fps["floor"],
            None,
            numbers=numbers,
        )
        for t in routers
        if t > 2
    )
    for r in results:
        show(r)
    return results
