"""Side-by-side performance measurements of chx-masks against baselines and a peer.

Run by developers and CI-like checks, never by pytest (the file is not named
``test_*`` and ``benchmarks/`` is outside pytest's testpaths)::

    python benchmarks/run.py                 # the six measurements (~5-10 min)
    python benchmarks/run.py --quick         # a smoke run (~2 min)
    python benchmarks/run.py --only live --json results.json

Every comparison runs its contenders in this one process, interleaved
(A, B, C, B, C, A, ...), and reports the ratio of their medians together with
its target and PASS/FAIL. Absolute numbers are printed too, but only the ratios
travel between machines. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache"

K4M = "eiger4m_single_image"
K1M = "eiger1m_single_image"
SHAPE_4M = (2167, 2070)
SHAPE_1M = (1065, 1030)
NAMES_4M = ["module_gaps", "chip_lines", "beamstop", "hot_pixels"]
NAMES_1M = ["module_gaps", "beamstop", "hot_pixels"]
MiB = 1 << 20

MEASUREMENTS = ("live", "peer", "run_start", "scale", "replay", "memory", "process")


# --------------------------------------------------------------------------- results


@dataclass
class Ratio:
    """One reported figure: a ratio of two medians measured in the same run."""

    measurement: str
    label: str
    ratio: float
    target: str | None = None  # e.g. ">= 0.5"; None: reported, no target
    passed: bool | None = None
    numbers: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def judged(measurement: str, label: str, ratio: float, target: str | None, **kw: Any) -> Ratio:
    passed = None
    if target is not None:
        op, bound = target.split()
        passed = ratio >= float(bound) if op == ">=" else ratio <= float(bound)
    return Ratio(measurement, label, float(ratio), target, passed, **kw)


def show(result: Ratio) -> None:
    verdict = "" if result.passed is None else ("PASS" if result.passed else "FAIL")
    target = f"target {result.target}" if result.target else "(no target)"
    print(f"    {result.label:<54} {result.ratio:8.3f}   {target:<14} {verdict}", flush=True)
    if result.note:
        print(f"      {result.note}", flush=True)


def line(text: str) -> None:
    print(f"      {text}", flush=True)


# --------------------------------------------------------------------------- timing


def interleaved(
    contenders: dict[str, Callable[[], Any]], reps: int, *, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each contender, run in rotating interleaved order.

    Rotating the order each repetition keeps any one contender from always
    running right after another (cache, allocator and turbo effects). The
    cyclic garbage collector is held off while a sample runs, not forced
    between samples: a full collection is a pause of ~0.2 s, after which
    the next few milliseconds of any contender run measurably slower (idle
    cores clock down), which is not how frames stream during a scan.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            gc.disable()
            try:
                start = time.perf_counter()
                contenders[name]()
                samples[name].append(time.perf_counter() - start)
            finally:
                gc.enable()
    return {name: statistics.median(values) for name, values in samples.items()}


def fmt_s(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


# --------------------------------------------------------------------------- fixtures


def noop(name: str, doc: dict) -> None:
    """The downstream of every router here: takes the documents, keeps nothing."""


def component_masks(shape: tuple[int, int], names: list[str], seed: int = 0) -> dict:
    """Deterministic CHX-like masks (True = kept) for a detector shape."""
    from bluesky_callbacks.sim import EigerPattern

    rows, cols = shape
    rng = np.random.default_rng(seed)
    r, c = np.ogrid[:rows, :cols]
    made = {
        # The simulated detector's own gaps and hot pixels, as pyFAI would give.
        "module_gaps": ~EigerPattern(shape).bad_pixels,
        "chip_lines": ~(((r % 256) == 255) | ((c % 256) == 255)),
        "beamstop": ~(
            (np.hypot(r - 0.55 * rows, c - 0.45 * cols) < 60)
            | ((np.abs(r - 0.55 * rows) < 6) & (c < 0.45 * cols))
        ),
        "hot_pixels": rng.random(shape) > 1e-3,
    }
    return {name: np.ascontiguousarray(made[name]) for name in names}


class Fixtures:
    """What several measurements share, built on first use, in one temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._reg = None
        self._re = None
        self._runs: dict[tuple, list[tuple[str, dict]]] = {}

    def registry_dir(self) -> Path:
        self.registry()
        return self.root / "registry"

    def registry(self):
        """An embedded registry: 4 masks for the 4M and 3 for the 1M."""
        if self._reg is None:
            self._reg = make_registry(self.root / "registry")
        return self._reg

    def run_engine(self):
        if self._re is None:
            from bluesky import RunEngine

            self._re = RunEngine({}, context_managers=[])
        return self._re

    def record(self, det: Any, n: int, key: str, names: list[str], tag: str) -> list:
        """Documents of a real ``count([det], num=n)`` run with MaskProvenance."""
        from bluesky.plans import count

        from bluesky_callbacks import MaskProvenance

        if tag not in self._runs:
            RE = self.run_engine()
            docs: list[tuple[str, dict]] = []
            RE.preprocessors[:] = [MaskProvenance(self.registry(), masks={key: names})]
            token = RE.subscribe(lambda name, doc: docs.append((name, doc)))
            try:
                RE(count([det], num=n))
            finally:
                RE.unsubscribe(token)
                RE.preprocessors[:] = []
            self._runs[tag] = docs
        return self._runs[tag]

    def close(self) -> None:
        if self._reg is not None:
            self._reg.close()


def make_registry(path: Path, *, active_4m: bool = False):
    from chx_masks import MaskRegistry

    reg = MaskRegistry.embedded(path)
    for key, shape, names in ((K4M, SHAPE_4M, NAMES_4M), (K1M, SHAPE_1M, NAMES_1M)):
        for name, mask in component_masks(shape, names).items():
            reg.register_mask(key, name, mask)
    if active_4m:
        reg.activate(K4M, NAMES_4M, note="benchmark")
    return reg


def pages_of(events: list[dict], size: int) -> list[dict]:
    from event_model import pack_event_page

    return [pack_event_page(*events[i : i + size]) for i in range(0, len(events), size)]


# --------------------------------------------------------------------------- 1. live


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


def split_run(docs: list) -> tuple[dict, dict, list[dict], dict]:
    start = next(d for n, d in docs if n == "start")
    descriptor = next(d for n, d in docs if n == "descriptor")
    events = [d for n, d in docs if n == "event"]
    stop = next(d for n, d in docs if n == "stop")
    return start, descriptor, events, stop


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


# --------------------------------------------------------------------------- 2. peer


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


# --------------------------------------------------------------------------- 3. run start


def naive_open_run(root: Any, detector: str, names: list[str]) -> dict:
    """What a client without the registry's caches does at each run start.

    For each name: search the detector's slot containers by metadata for the
    name, take the highest version, search the masks by that uid and read the
    array; then AND the arrays and hash the composite.
    """
    from tiled.queries import Key

    slots = root["detectors"][detector]
    masks = root["masks"]
    uids, versions, arrays = [], [], []
    for name in names:
        current = max(
            (node.metadata for node in slots.search(Key("name") == name).values()),
            key=lambda md: md["version"],
        )
        if current["kind"] != "mask":
            raise KeyError(f"{detector}/{name} is retired")
        (node,) = masks.search(Key("uid") == current["uid"]).values()
        arrays.append(np.asarray(node.read(), dtype=bool))
        uids.append(current["uid"])
        versions.append(current["version"])
    composite = np.logical_and.reduce(arrays)
    digest = hashlib.sha256(np.packbits(composite).tobytes()).hexdigest()
    return {"names": names, "uids": uids, "versions": versions, "sha256": digest}


RUN_MD = {"plan_name": "count", "detectors": ["eiger4m_single"], "num_points": 100}


def child_cold(kind: str, directory: str) -> None:
    """In a fresh process: open the registry (not timed), time the first run start."""
    import tiled.queries  # noqa: F401 - both contenders get tiled's query module for free

    from bluesky_callbacks import MaskProvenance
    from chx_masks import MaskRegistry

    reg = MaskRegistry.embedded(directory)
    if kind == "ours":
        provenance = MaskProvenance(reg, masks={K4M: NAMES_4M})
        start = time.perf_counter()
        md = provenance.start_metadata(RUN_MD, staged=["eiger4m_single"])
        seconds = time.perf_counter() - start
        uids = md["masks"][K4M]["uids"]
    else:
        start = time.perf_counter()
        record = naive_open_run(reg._root, K4M, NAMES_4M)
        seconds = time.perf_counter() - start
        uids = record["uids"]
    reg.close()
    print(json.dumps({"seconds": seconds, "uids": uids}))


def run_child(*args: str, mask_cache: Path | None = None) -> dict:
    """Run ``run.py --child ARGS`` in a fresh interpreter; ``mask_cache``: its local copies."""
    env = dict(os.environ)
    if mask_cache is not None:
        env["CHX_MASKS_CACHE_DIR"] = str(mask_cache)
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fill_local_copies(directory: str, cache: Path) -> None:
    """Read the 4M masks once with a registry whose local copies go to ``cache``."""
    from chx_masks import MaskRegistry

    before = os.environ.get("CHX_MASKS_CACHE_DIR")
    os.environ["CHX_MASKS_CACHE_DIR"] = str(cache)
    try:
        with MaskRegistry.embedded(directory) as reader:
            reader.resolve_composite(K4M, NAMES_4M)
    finally:
        if before is None:
            del os.environ["CHX_MASKS_CACHE_DIR"]
        else:
            os.environ["CHX_MASKS_CACHE_DIR"] = before


def bench_run_start(fx: Fixtures, quick: bool) -> list[Ratio]:
    from bluesky_callbacks import MaskProvenance

    reg = fx.registry()
    directory = str(fx.registry_dir())
    cold_samples = 2 if quick else 5
    reps = 7 if quick else 21
    # The registry keeps verified local copies of mask arrays it has read
    # (CHX_MASKS_CACHE_DIR), so a fresh process is cold in two ways: on a
    # machine where the masks were read before (one untimed reader fills the
    # copies first), and the first read of those masks on this machine.
    shared = fx.root / "cold-mask-cache"
    fill_local_copies(directory, shared)
    kinds = {
        "ours (local copies)": lambda: run_child("cold", "ours", directory, mask_cache=shared),
        "ours (first read)": lambda: run_child(
            "cold", "ours", directory, mask_cache=Path(tempfile.mkdtemp(dir=fx.root))
        ),
        "naive": lambda: run_child("cold", "naive", directory, mask_cache=shared),
    }
    cold: dict[str, list[float]] = {k: [] for k in kinds}
    uids: dict[str, list[str]] = {}
    names = list(kinds)
    for i in range(cold_samples):
        for kind in names[i % 3 :] + names[: i % 3]:
            got = kinds[kind]()
            cold[kind].append(got["seconds"])
            uids[kind] = got["uids"]
        line(
            f"cold sample {i + 1}/{cold_samples}: "
            + ", ".join(f"{k} {fmt_s(v[-1])}" for k, v in cold.items())
        )
    if len({tuple(u) for u in uids.values()}) != 1:
        raise AssertionError("MaskProvenance and the naive client resolved different uids.")
    cold_med = {k: statistics.median(v) for k, v in cold.items()}

    provenance = MaskProvenance(reg, masks={K4M: NAMES_4M})
    root = reg._root
    warm = interleaved(
        {
            "ours": lambda: provenance.start_metadata(RUN_MD, staged=["eiger4m_single"]),
            "naive": lambda: naive_open_run(root, K4M, NAMES_4M),
        },
        reps,
    )
    line(f"warm: MaskProvenance {fmt_s(warm['ours'])}, naive {fmt_s(warm['naive'])} (medians)")

    results = [
        judged(
            "run_start",
            f"cold, {which}: MaskProvenance/naive",
            cold_med[f"ours ({which})"] / cold_med["naive"],
            "<= 0.2",
            numbers={"ours_s": cold_med[f"ours ({which})"], "naive_s": cold_med["naive"]},
        )
        for which in ("local copies", "first read")
    ]
    results.append(
        judged(
            "run_start",
            "warm: MaskProvenance/naive",
            warm["ours"] / warm["naive"],
            "<= 0.05",
            numbers={f"{k}_s": v for k, v in warm.items()},
        )
    )
    if not quick:
        results.append(warm_active_set(fx, reps))
    for r in results:
        show(r)
    return results


def warm_active_set(fx: Fixtures, reps: int) -> Ratio:
    """Warm run start with the names from the detector's active set, as on the beamline."""
    from bluesky_callbacks import MaskProvenance

    with tempfile.TemporaryDirectory(dir=fx.root) as tmp:
        active_reg = make_registry(Path(tmp) / "registry", active_4m=True)
        try:
            active = MaskProvenance(active_reg, masks={K4M: ["module_gaps"]})
            active_root = active_reg._root
            assert active.start_metadata(RUN_MD)["masks"][K4M]["chosen_by"].startswith("active")
            warm_active = interleaved(
                {
                    "ours": lambda: active.start_metadata(RUN_MD, staged=["eiger4m_single"]),
                    "naive": lambda: naive_open_run(active_root, K4M, NAMES_4M),
                },
                reps,
            )
        finally:
            active_reg.close()
    line(
        f"warm, names from an active set: MaskProvenance {fmt_s(warm_active['ours'])}, "
        f"naive {fmt_s(warm_active['naive'])}"
    )
    return judged(
        "run_start",
        "warm, active set: MaskProvenance/naive",
        warm_active["ours"] / warm_active["naive"],
        None,
        numbers={f"{k}_s": v for k, v in warm_active.items()},
    )


# --------------------------------------------------------------------------- 4. scale

SCALE_SHAPE = (16, 16)
SCALE_VERSIONS = 4
SCALE_NAMES = 50
SMALL_LAYOUT = {"name_00": 4, "name_01": 3, "name_02": 3}  # 10 masks
PROBE_DET = "bench_det_000"
PROBE_NAMES = list(SMALL_LAYOUT)


def scale_mask(det_index: int, name_index: int, version: int) -> np.ndarray:
    mask = np.ones(SCALE_SHAPE, bool)
    mask[version % 16, name_index % 16] = False
    mask[(det_index // 16) % 16, det_index % 16] = False
    return mask


def scale_layout(total: int) -> list[str]:
    """Detectors of SCALE_NAMES names x SCALE_VERSIONS versions each, ``total`` masks."""
    per_detector = SCALE_NAMES * SCALE_VERSIONS
    if total % per_detector:
        raise ValueError(f"total must be a multiple of {per_detector}")
    return [f"bench_det_{i:03d}" for i in range(total // per_detector)]


def fill_worker(directory: str, detectors: list[str], counter: Any) -> None:
    """Register every name x version of ``detectors`` (one of the parallel writers)."""
    warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
    from chx_masks import MaskRegistry

    with MaskRegistry.embedded(directory) as reg:
        for det in detectors:
            d = int(det.rsplit("_", 1)[1])
            for version in range(SCALE_VERSIONS):
                for j in range(SCALE_NAMES):
                    name = f"name_{j:02d}"
                    mask = scale_mask(d, j, version)
                    if version == 0:
                        reg.register_mask(det, name, mask)
                    else:
                        reg.update_mask(det, name, mask)
                    with counter.get_lock():
                        counter.value += 1


def filled_registry(total: int):
    """The ``total``-mask registry, filled once and cached under benchmarks/.cache/."""
    import multiprocessing

    import tiled

    from chx_masks import MaskRegistry

    try:
        from chx_masks._registry import SCHEMA_VERSION
    except ImportError:
        SCHEMA_VERSION = "?"
    key = f"scale-{total}-v{SCHEMA_VERSION}-tiled{tiled.__version__}"
    directory = CACHE / key
    done = directory / "complete.json"
    if done.exists():
        reg = MaskRegistry.embedded(directory)
        try:
            ok = len(reg.history(PROBE_DET, "name_00")) == SCALE_VERSIONS
        except Exception:
            ok = False
        if ok:
            info = json.loads(done.read_text())
            line(
                f"cached {total}-mask registry: {directory.relative_to(REPO)} "
                f"(filled in {info['fill_seconds']:.0f} s on {info['date']})"
            )
            return reg, info["fill_seconds"]
        reg.close()
        line(f"cached registry {directory.name} does not answer as expected: filling again")
    if directory.exists():
        shutil.rmtree(directory)
    CACHE.mkdir(exist_ok=True)
    detectors = scale_layout(total)
    workers = max(1, min(2, os.cpu_count() or 1))
    line(
        f"filling a {total}-mask registry ({len(detectors)} detectors {SCALE_SHAPE} x "
        f"{SCALE_NAMES} names x {SCALE_VERSIONS} versions) with {workers} writer processes; "
        "cached for later runs"
    )
    begin = time.perf_counter()
    with MaskRegistry.embedded(directory) as reg:
        for det in detectors:
            reg.register_detector(det, SCALE_SHAPE)
    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("i", 0)
    procs = [
        ctx.Process(target=fill_worker, args=(str(directory), detectors[w::workers], counter))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    last = -1
    while any(p.is_alive() for p in procs):
        time.sleep(1.0)
        value = counter.value
        step = max(1, total // 20)
        if value // step != last // step or not any(p.is_alive() for p in procs):
            elapsed = time.perf_counter() - begin
            rate = value / elapsed if elapsed else 0.0
            eta = (total - value) / rate if rate else float("nan")
            line(
                f"  filled {value:>6}/{total}  {elapsed:6.0f} s  ({rate:.1f} masks/s, "
                f"~{eta:.0f} s left)"
            )
            last = value
    if any(p.exitcode != 0 for p in procs) or counter.value != total:
        raise RuntimeError(f"filling the registry failed ({counter.value}/{total} masks)")
    seconds = time.perf_counter() - begin
    done.write_text(
        json.dumps({"fill_seconds": seconds, "masks": total, "date": dt.date.today().isoformat()})
    )
    line(f"filled {total} masks in {seconds:.0f} s")
    return MaskRegistry.embedded(directory), seconds


def small_registry(path: Path):
    from chx_masks import MaskRegistry

    reg = MaskRegistry.embedded(path)
    reg.register_detector(PROBE_DET, SCALE_SHAPE)
    for j, (name, versions) in enumerate(SMALL_LAYOUT.items()):
        for version in range(versions):
            mask = scale_mask(0, j, version)
            if version == 0:
                reg.register_mask(PROBE_DET, name, mask)
            else:
                reg.update_mask(PROBE_DET, name, mask)
    return reg


def bench_scale(fx: Fixtures, quick: bool) -> list[Ratio]:
    total = 10_000
    cached = any(CACHE.glob(f"scale-{total}-*/complete.json"))
    if quick and not cached:
        total = 1_000
        line(
            "quick run without a cached 10,000-mask registry: using 1,000 masks "
            "(run the full benchmark once to fill the cache)"
        )
    reps = 7 if quick else 21
    small = small_registry(fx.root / "small-registry")
    big, fill_seconds = filled_registry(total)
    try:
        calls = {
            "get_mask_uid": lambda reg: reg.get_mask_uid(PROBE_DET, "name_00"),
            "resolve_composite": lambda reg: reg.resolve_composite(PROBE_DET, PROBE_NAMES),
        }
        for reg in (small, big):  # the same question has the same kind of answer in both
            if reg.resolve_composite(PROBE_DET, PROBE_NAMES).versions[0] != SCALE_VERSIONS - 1:
                raise AssertionError(f"{PROBE_DET}/name_00 is not at version 3 in {reg}")
        contenders = {
            f"{op} {size}": functools_partial(call, reg)
            for op, call in calls.items()
            for size, reg in (("small", small), ("big", big))
        }
        med = interleaved(contenders, reps)
        results = []
        for op in calls:
            t_small, t_big = med[f"{op} small"], med[f"{op} big"]
            line(f"{op}: {fmt_s(t_small)} with 10 masks, {fmt_s(t_big)} with {total:,}")
            results.append(
                judged(
                    "scale",
                    f"{op}: time({total:,})/time(10)",
                    t_big / t_small,
                    "<= 2",
                    numbers={
                        "small_s": t_small,
                        "big_s": t_big,
                        "masks": total,
                        "fill_seconds": fill_seconds,
                    },
                )
            )
            show(results[-1])
        return results
    finally:
        small.close()
        big.close()


def functools_partial(call: Callable[[Any], Any], reg: Any) -> Callable[[], Any]:
    return lambda: call(reg)


# --------------------------------------------------------------------------- 5. replay


def bench_replay(fx: Fixtures, quick: bool) -> list[Ratio]:
    import dask.array as da
    from bluesky.plans import count
    from bluesky_tiled_plugins import TiledWriter

    from bluesky_callbacks import MaskProvenance, masked_frames, open_run_store
    from bluesky_callbacks.sim import sim_eiger1m

    n = 15 if quick else 60
    reps = 2 if quick else 5
    reg = fx.registry()
    RE = fx.run_engine()
    frames_dir = fx.root / "frames-1m"
    store = open_run_store(fx.root / "runs", readable_storage=[frames_dir])
    results = []
    try:
        writer = TiledWriter(store)
        token = RE.subscribe(writer)
        RE.preprocessors[:] = [MaskProvenance(reg, masks={K1M: NAMES_1M})]
        uids = {}
        try:
            for mode in ("files", "inline"):
                det = (
                    sim_eiger1m(mode="files", save_path=frames_dir)
                    if mode == "files"
                    else sim_eiger1m()
                )
                begin = time.perf_counter()
                (uids[mode],) = RE(count([det], num=n))
                line(f"stored {n} eiger1m frames ({mode}) in {time.perf_counter() - begin:.1f} s")
        finally:
            RE.unsubscribe(token)
            RE.preprocessors[:] = []
        for mode, what in (
            ("files", ".npy files served by tiled"),
            ("inline", "inline frames, stored by TiledWriter as zarr"),
        ):
            run = store[uids[mode]]
            probe = masked_frames(run, K1M, registry=reg)
            chunks = probe.chunks
            mask = reg.composite_from_uids(run.metadata["start"]["mask_uids"]).mask
            sample = probe[-1].compute()
            expected = np.asarray(run["primary"][K1M][n - 1]) * mask
            if not np.array_equal(sample, expected):
                raise AssertionError("masked_frames differ from frame * mask")

            def masked(run=run) -> None:
                masked_frames(run, K1M, registry=reg).compute()

            def unmasked(run=run, chunks=chunks) -> None:
                array = run["primary"][K1M]
                da.from_array(
                    array, chunks=chunks, asarray=True, meta=np.empty((0, 0, 0), dtype=array.dtype)
                ).compute()

            med = interleaved({"masked": masked, "unmasked": unmasked}, reps)
            line(
                f"{what}: masked {fmt_s(med['masked'])}, unmasked {fmt_s(med['unmasked'])} "
                f"({n} frames, dask chunks of {chunks[0][0]} frames)"
            )
            results.append(
                judged(
                    "replay",
                    f"masked/unmasked ({mode})",
                    med["masked"] / med["unmasked"],
                    "<= 1.2",
                    numbers={f"{k}_s": v for k, v in med.items()} | {"frames": n},
                )
            )
            show(results[-1])
    finally:
        store.context.close()
    return results


# --------------------------------------------------------------------------- 6. memory


def proc_status(field_name: str) -> int:
    for text in Path("/proc/self/status").read_text().splitlines():
        if text.startswith(field_name + ":"):
            return int(text.split()[1]) * 1024
    raise KeyError(field_name)


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


# --------------------------------------------------------------------------- 7. process


def child_process(
    kind: str, registry_dir: str, runs_dir: str, processed_dir: str, uid: str, frames_per_chunk: str
) -> None:
    """In a fresh process: end-of-run processing of one stored run; time and peak RSS.

    ``ours`` is ``process_run`` (chunks in flight, bounded); ``naive`` reads the
    whole run, multiplies, finds the non-zero pixels and writes one sparse block.
    """
    from bluesky_callbacks import RunStore, process_run
    from chx_masks import MaskRegistry

    reg = MaskRegistry.embedded(registry_dir)
    runs = RunStore(runs_dir).open()
    processed = RunStore(processed_dir).open(runs=False)
    start = runs[uid].metadata["start"]
    mask = reg.composite_from_uids(start["masks"][K1M]["uids"]).mask
    gc.collect()
    baseline = proc_status("VmRSS")
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    begin = time.perf_counter()
    if kind == "ours":
        product = process_run(
            uid,
            runs=runs,
            processed=processed,
            registry=reg,
            frames_per_chunk=int(frames_per_chunk),
        )
        nonzero = product.nonzero[K1M]
    else:
        frames = runs[uid]["primary"][K1M].read()
        masked = frames * mask.astype(frames.dtype)
        coords = np.nonzero(masked)
        data = masked[coords]
        processed.write_sparse(
            coords=np.stack(coords).astype(np.uint16), data=data, shape=masked.shape, key=uid
        )
        nonzero = int(data.size)
    seconds = time.perf_counter() - begin
    peak = proc_status("VmHWM")
    reg.close()
    print(
        json.dumps(
            {"seconds": seconds, "extra": peak - baseline, "nonzero": nonzero, "hwm_reset": reset}
        )
    )


def bench_process(fx: Fixtures, quick: bool) -> list[Ratio]:
    from bluesky.plans import count
    from bluesky_tiled_plugins import TiledWriter

    from bluesky_callbacks import MaskProvenance, open_run_store
    from bluesky_callbacks.sim import sim_eiger1m

    short, long_ = (8, 32) if quick else (20, 80)
    per_chunk = 2
    reg = fx.registry()
    RE = fx.run_engine()
    runs_dir = fx.root / "runs-process"
    store = open_run_store(runs_dir)
    uids = {}
    token = RE.subscribe(TiledWriter(store))
    RE.preprocessors[:] = [MaskProvenance(reg, masks={K1M: NAMES_1M})]
    try:
        for n in (short, long_):
            begin = time.perf_counter()
            (uids[n],) = RE(count([sim_eiger1m()], num=n))
            line(f"stored {n} inline eiger1m frames in {time.perf_counter() - begin:.1f} s")
    finally:
        RE.unsubscribe(token)
        RE.preprocessors[:] = []
        store.context.close()
    frame_bytes = int(np.prod(SHAPE_1M)) * 4
    got: dict[tuple[str, int], dict] = {}
    for n in (short, long_):
        for kind in ("ours", "naive"):  # interleaved, each in a fresh process
            out = fx.root / f"processed-{kind}-{n}"
            got[(kind, n)] = run_child(
                "process",
                kind,
                str(fx.registry_dir()),
                str(runs_dir),
                str(out),
                uids[n],
                str(per_chunk),
            )
            r = got[(kind, n)]
            line(
                f"{kind:5s} {n:3d} frames ({n * frame_bytes / MiB:.0f} MiB raw): "
                f"{r['seconds']:.2f} s, peak +{r['extra'] / MiB:.0f} MiB, "
                f"{r['nonzero']} non-zero pixels stored"
            )
    if got[("ours", long_)]["nonzero"] != got[("naive", long_)]["nonzero"]:
        raise AssertionError("the two contenders stored different pixels")
    results = [
        judged(
            "process",
            f"extra peak RSS, {long_} / {short} frames, process_run",
            got[("ours", long_)]["extra"] / got[("ours", short)]["extra"],
            "<= 1.5",
            numbers={f"extra_{n}": got[("ours", n)]["extra"] for n in (short, long_)},
        ),
        judged(
            "process",
            f"extra peak RSS, {long_} / {short} frames, read-it-all",
            got[("naive", long_)]["extra"] / got[("naive", short)]["extra"],
            None,
            numbers={f"extra_{n}": got[("naive", n)]["extra"] for n in (short, long_)},
        ),
        judged(
            "process",
            f"extra peak RSS at {long_} frames, process_run / read-it-all",
            got[("ours", long_)]["extra"] / got[("naive", long_)]["extra"],
            None,
        ),
        judged(
            "process",
            f"seconds at {long_} frames, process_run / read-it-all",
            got[("ours", long_)]["seconds"] / got[("naive", long_)]["seconds"],
            None,
            numbers={
                "ours_s": got[("ours", long_)]["seconds"],
                "naive_s": got[("naive", long_)]["seconds"],
            },
        ),
    ]
    for result in results:
        show(result)
    return results


# --------------------------------------------------------------------------- main


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    rev = (
        subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        or "unknown"
    )
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "chx_masks", "bluesky_callbacks"],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    changed = sorted({ln[3:] for ln in dirty if ln.strip()})
    # The exact code measured, committed or not: a digest of the library's sources.
    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("chx_masks/*.py"), *REPO.glob("bluesky_callbacks/*.py")]):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    versions = {}
    for dist in (
        "numpy",
        "tiled",
        "bluesky",
        "event-model",
        "dask",
        "h5py",
        "bluesky-tiled-plugins",
        "bluesky-darkframes",
    ):
        from importlib.metadata import PackageNotFoundError, version

        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "git_rev": rev,
        "uncommitted_library_changes": changed,
        "library_sources_sha256": digest.hexdigest()[:16],
        "versions": versions,
    }


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        # tiled's in-process transport: starlette marks httpx TestClient use deprecated.
        warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
        warnings.filterwarnings("ignore", message=".*httpx.*starlette.*")
        yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (~2 min)")
    parser.add_argument(
        "--only",
        choices=MEASUREMENTS,
        action="append",
        help="run only this measurement (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="also save the results to this JSON file")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the router during the live measurement"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    # Nothing here touches the user's cache/data directories (embedded catalog template).
    os.environ.setdefault("XDG_CACHE_HOME", str(CACHE / "xdg-cache"))
    os.environ.setdefault("XDG_DATA_HOME", str(CACHE / "xdg-data"))
    for name in ("CHX_MASKS_URI", "CHX_MASKS_API_KEY", "CHX_MASKS_PROFILE"):
        os.environ.pop(name, None)

    if args.child:
        with quiet():
            kind, *rest = args.child
            {"cold": child_cold, "memory": child_memory, "process": child_process}[kind](*rest)
        return 0

    info = machine_info()
    print("chx-masks benchmarks" + (" (--quick)" if args.quick else ""))
    print(
        f"  date {info['date']}   git {info['git_rev']}"
        + (
            f" + uncommitted: {', '.join(info['uncommitted_library_changes'])}"
            if info["uncommitted_library_changes"]
            else ""
        )
        + f"; library sources sha256 {info['library_sources_sha256']}"
    )
    print(
        f"  {info['cpu_count']} CPUs ({info['cpus_usable']} usable), {info['cpu_model']}, "
        f"{info['memory_gib']} GiB, Python {info['python']}"
    )
    print("  " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    # Other processes on the machine share its cores and memory bandwidth: say how busy it is.
    print(
        f"  load average {' '.join(map(str, info['load_average_at_start']))} (1/5/15 min) at start",
        flush=True,
    )

    selected = args.only or list(MEASUREMENTS)
    titles = {
        "live": "live masking: MaskingRouter on eiger4m event_pages vs np.copyto and frame*mask",
        "peer": "peer: MaskingRouter vs bluesky-darkframes DarkSubtraction, same event_pages",
        "run_start": "run start: MaskProvenance at open_run vs a naive tiled client, cold & warm",
        "scale": "scale: get_mask_uid / resolve_composite with 10 vs 10,000 masks",
        "replay": "replay: masked_frames of a stored eiger1m run vs the same frames unmasked",
        "memory": "memory: peak RSS of the live router over a 4M scan",
        "process": "process: end-of-run sparse product, bounded chunks vs read-it-all",
    }
    runners = {
        "live": lambda fx: bench_live(fx, args.quick, args.profile),
        "peer": lambda fx: bench_peer(fx, args.quick),
        "run_start": lambda fx: bench_run_start(fx, args.quick),
        "scale": lambda fx: bench_scale(fx, args.quick),
        "replay": lambda fx: bench_replay(fx, args.quick),
        "memory": lambda fx: bench_memory(fx, args.quick),
        "process": lambda fx: bench_process(fx, args.quick),
    }
    results: list[Ratio] = []
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    begin = time.perf_counter()
    with quiet(), tempfile.TemporaryDirectory(prefix="chx-masks-bench-") as tmp:
        fx = Fixtures(Path(tmp))
        # The registry's local copies of mask arrays stay in this run's temporary directory.
        os.environ["CHX_MASKS_CACHE_DIR"] = str(fx.root / "mask-cache")
        try:
            for i, name in enumerate(m for m in MEASUREMENTS if m in selected):
                print(f"\n[{i + 1}/{len(selected)}] {titles[name]}", flush=True)
                started = time.perf_counter()
                try:
                    results.extend(runners[name](fx))
                except Exception:
                    errors[name] = traceback.format_exc()
                    print(f"    ERROR in {name}:\n{errors[name]}", flush=True)
                timings[name] = time.perf_counter() - started
                line(f"({timings[name]:.0f} s)")
        finally:
            fx.close()
    total = time.perf_counter() - begin
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    print("\nSummary (ratio of medians measured side by side in this run)")
    for result in results:
        show(result)
    judged_results = [r for r in results if r.passed is not None]
    passed = sum(bool(r.passed) for r in judged_results)
    print(
        f"\n{passed}/{len(judged_results)} targets met"
        + (f", {len(errors)} measurement(s) failed to run: {', '.join(errors)}" if errors else "")
        + f"; total {total:.0f} s; load average at the end "
        + " ".join(map(str, info["load_average_at_end"]))
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "quick": args.quick,
                    "seconds": total,
                    "timings": timings,
                    "results": [asdict(r) for r in results],
                    "errors": errors,
                },
                indent=2,
                default=str,
            )
        )
        print(f"results saved to {args.json}")
    # A missed target is information, not a crash: only errors change the exit status.
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
