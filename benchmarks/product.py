"""End-of-run products on realistic data: size against the raw run, time against reading it.

A real RunEngine scans a simulated Eiger (ophyd-async, DECTRIS-layout files,
bitshuffle-LZ4, XPCS frames of 0.05 photons per pixel) with MaskProvenance
into a local run store (TiledWriter). ``process_run`` then stores the masked
frames twice, side by side: as files (the default for a local store) and
inside tiled, sparse (``files=False``, the former product). Printed: bytes
per frame of each against the raw data files, the seconds of each against
reading the raw frames through the same store, and a verdict per target.

    python benchmarks/product.py            # Eiger 500K 150 frames, Eiger 4M 40 frames
    python benchmarks/product.py --quick    # fewer frames
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def disk_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path``."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def record(root: Path, name: str, shape: tuple[int, int], frames: int):
    """A masked scan of ``frames`` XPCS frames; the run store, its uid and the frames' dir."""
    from bluesky import RunEngine
    from bluesky.plans import count
    from bluesky_tiled_plugins import TiledWriter
    from ophyd_async.plan_stubs import ensure_connected

    from bluesky_callbacks import MaskProvenance, open_run_store
    from bluesky_callbacks._eiger import XPCSPattern
    from bluesky_callbacks._sim_async import SimAsyncEiger
    from chx_masks import MaskRegistry

    key = f"{name}_image"
    registry = MaskRegistry.embedded(root / "registry")
    rows, cols = shape
    stop = np.ones(shape, bool)
    stop[int(0.5 * rows) - 20 : int(0.5 * rows) + 20, : int(0.45 * cols)] = False
    if not registry.missing_names(key, ["beamstop"]) == ():
        registry.register_mask(key, "beamstop", stop)
    frames_dir = root / f"frames-{name}"
    store = open_run_store(root / "runs", readable_storage=[frames_dir])
    engine = RunEngine({}, context_managers=[])
    engine.preprocessors.append(MaskProvenance(registry, masks={key: ["beamstop"]}, active=False))
    engine.subscribe(TiledWriter(store))
    det = SimAsyncEiger(name, frames_dir, pattern=XPCSPattern(shape, mean=0.05), frames_per_file=50)
    engine(ensure_connected(det))
    (uid,) = engine(count([det], num=frames))
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(timeout=5)
    return registry, store, uid, frames_dir, key


def read_raw(store, uid: str, key: str, per_chunk: int) -> float:
    """Seconds to read every raw frame through the store, chunk by chunk."""
    from bluesky_callbacks._process import _frames_node

    node = _frames_node(store[uid], "primary", key)
    n = node.shape[0]
    begin = time.perf_counter()
    for a in range(0, n, per_chunk):
        np.asarray(node[a : a + per_chunk])
    return time.perf_counter() - begin


def measure(root: Path, name: str, shape: tuple[int, int], frames: int, reps: int) -> dict:
    from bluesky_callbacks import RunStore, process_run

    registry, store, uid, frames_dir, key = record(root, name, shape, frames)
    raw = disk_bytes(frames_dir)
    sizes: dict[str, int] = {}
    times: dict[str, list[float]] = {"read raw": [], "files": [], "sparse": [], "open store": []}
    per_chunk = max(1, (64 << 20) // (int(np.prod(shape)) * 4))
    for rep in range(reps):
        times["read raw"].append(read_raw(store, uid, key, per_chunk))
        for kind in ("files", "sparse"):
            out = root / f"processed-{name}-{kind}-{rep}"
            # A processing worker keeps its processed store open: opening a new
            # local one (building its tiled app) is timed apart.
            begin = time.perf_counter()
            RunStore(str(out)).open(runs=False)
            times["open store"].append(time.perf_counter() - begin)
            begin = time.perf_counter()
            product = process_run(
                uid,
                runs=RunStore(str(root / "runs")).reading([frames_dir]),
                processed=out,
                registry=registry,
                files=None if kind == "files" else False,
            )
            times[kind].append(time.perf_counter() - begin)
            sizes[kind] = disk_bytes(out / "data")
            dense = product.dense(out, key)
    raw_frames = np.asarray(store[uid]["primary"][key].read())
    mask = registry.get_mask(key, "beamstop").compute()
    if not np.array_equal(dense, raw_frames * mask.astype(raw_frames.dtype)):
        raise AssertionError("the product is not raw x mask")
    registry.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "name": name,
        "frames": frames,
        "raw": raw,
        "sizes": sizes,
        "seconds": med,
        "nonzero": product.nonzero[key],
    }


def live(root: Path, frames: int) -> dict[str, float]:
    """Router rate on a recorded 4M scan: alone, and persisting through TiledWriter."""
    from bluesky import RunEngine
    from bluesky.plans import count
    from bluesky_tiled_plugins import TiledWriter
    from ophyd_async.plan_stubs import ensure_connected

    from bluesky_callbacks import MaskingRouter, MaskProvenance, open_run_store
    from bluesky_callbacks._eiger import XPCSPattern
    from bluesky_callbacks._sim_async import SimAsyncEiger
    from chx_masks import MaskRegistry

    key = "eiger4m_single_image"
    shape = (2167, 2070)
    registry = MaskRegistry.embedded(root / "registry")
    stop = np.ones(shape, bool)
    stop[1000:1100, :900] = False
    registry.register_mask(key, "beamstop", stop)
    engine = RunEngine({}, context_managers=[])
    engine.preprocessors.append(MaskProvenance(registry, masks={key: ["beamstop"]}, active=False))
    docs: list[tuple[str, dict]] = []
    engine.subscribe(lambda name, doc: docs.append((name, doc)))
    det = SimAsyncEiger(
        "eiger4m_single", root / "frames", pattern=XPCSPattern(shape, mean=0.05), frames_per_file=50
    )
    engine(ensure_connected(det))
    engine(count([det], num=frames))
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(timeout=5)

    def rate(kind: str, rep: int) -> float:
        if kind == "alone":
            router = MaskingRouter(registry, lambda n, d: None, strict=True)
        else:
            store = open_run_store(
                root / f"store-{kind}-{rep}", readable_storage=[root / "frames", root / "derived"]
            )
            writer = TiledWriter(store)
            inline = [0]

            def persist(name: str, doc: dict, writer=writer, inline=inline) -> None:
                if name == "event_page" and key in doc["data"]:
                    inline[0] += len(doc["data"][key])
                writer(name, doc)

            router = MaskingRouter(
                registry,
                persist,
                strict=True,
                frames="files" if kind == "files" else "inline",
                directory=root / "derived" / f"{rep}",
            )
        begin = time.perf_counter()
        for name, doc in docs:
            router(name, doc)
        seconds = time.perf_counter() - begin
        if kind == "files" and inline[0]:
            raise AssertionError(f"{inline[0]} frames went inline with frames='files'")
        return frames / seconds

    got: dict[str, list[float]] = {"alone": [], "files": [], "inline": []}
    for rep in range(3):
        for kind in got:
            got[kind].append(rate(kind, rep))
    registry.close()
    return {k: statistics.median(v) for k, v in got.items()}


def proc_status(field: str) -> int:
    """Bytes of a /proc/self/status field (VmRSS, VmHWM)."""
    for row in Path("/proc/self/status").read_text().splitlines():
        if row.startswith(field + ":"):
            return int(row.split()[1]) * 1024
    raise KeyError(field)


def child_memory(root: str, uid: str, frames_dir: str, out: str) -> None:
    """In a fresh process: peak RSS growth of one process_run (files product)."""
    import gc
    import json

    from bluesky_callbacks import RunStore, process_run
    from chx_masks import MaskRegistry

    registry = MaskRegistry.embedded(Path(root) / "registry")
    runs = RunStore(str(Path(root) / "runs")).reading([frames_dir])
    runs.open()
    RunStore(out).open(runs=False)
    gc.collect()
    baseline = proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    process_run(uid, runs=runs, processed=out, registry=registry)
    print(json.dumps({"extra": proc_status("VmHWM") - baseline}))


def memory_growth(root: Path, short: int, long_: int) -> dict[int, int]:
    """Peak RSS growth of process_run on a 500K run of ``short`` and ``long_`` frames."""
    import json
    import subprocess

    extra = {}
    for n in (short, long_):
        _registry, store, uid, frames_dir, _key = record(root, "eiger500K_single", (514, 1030), n)
        _registry.close()
        store.context.close()
        got = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(root),
                uid,
                str(frames_dir),
                str(root / f"processed-memory-{n}"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        extra[n] = json.loads(got.stdout.strip().splitlines()[-1])["extra"]
    return extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_memory(*args.child)
        return 0
    warnings.filterwarnings("ignore", message=".*httpx.*starlette.*")
    os.environ.setdefault("CHX_MASKS_CACHE_DIR", tempfile.mkdtemp())
    cases = [
        ("eiger500K_single", (514, 1030), 40 if args.quick else 150),
        ("eiger4m_single", (2167, 2070), 10 if args.quick else 40),
    ]
    reps = 1 if args.quick else 3
    print(
        f"product benchmark, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    verdicts = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape, frames in cases:
            got = measure(Path(tmp) / name, name, shape, frames, reps)
            n = got["frames"]
            raw, files, sparse = got["raw"], got["sizes"]["files"], got["sizes"]["sparse"]
            sec = got["seconds"]
            print(
                f"{name} {shape[0]}x{shape[1]}, {n} frames, 0.05 photons/px, "
                f"{got['nonzero'] / n:.0f} non-zero pixels a frame after masking"
            )
            print(
                f"  stored bytes a frame: raw bitshuffle-LZ4 files {raw / n:,.0f}; product "
                f"files {files / n:,.0f}; product sparse in tiled {sparse / n:,.0f}"
            )
            print(
                f"  seconds (median of {reps}): read raw {sec['read raw']:.2f}; process_run "
                f"files {sec['files']:.2f}; sparse {sec['sparse']:.2f} (opening a new "
                f"processed store before it: {sec['open store']:.2f}, not counted)"
            )
            for label, ratio, target, ok in (
                ("product files / raw", files / raw, "<= 1.0", files / raw <= 1.0),
                ("product sparse / raw", sparse / raw, "-", None),
                (
                    "process_run files / read raw",
                    sec["files"] / sec["read raw"],
                    "<= 1.2",
                    sec["files"] / sec["read raw"] <= 1.2,
                ),
                ("process_run sparse / read raw", sec["sparse"] / sec["read raw"], "-", None),
            ):
                verdict = "" if ok is None else ("PASS" if ok else "FAIL")
                print(f"    {label:32s} {ratio:7.3f}  target {target:7s} {verdict}")
                if ok is not None:
                    verdicts.append(ok)
        n = 20 if args.quick else 100
        fps = live(Path(tmp) / "live", n)
        print(
            f"eiger4m_single, {n}-frame live scan (bitshuffle-LZ4, 0.05 photons/px), router "
            f"frames/s: alone {fps['alone']:.1f}; with TiledWriter, frames as files "
            f"{fps['files']:.1f}; frames inline {fps['inline']:.1f}"
        )
        for label, ratio, target in (
            ("router files+TiledWriter / alone", fps["files"] / fps["alone"], 0.7),
            ("router inline+TiledWriter / alone", fps["inline"] / fps["alone"], None),
        ):
            ok = None if target is None else ratio >= target
            print(
                f"    {label:32s} {ratio:7.3f}  target "
                f"{'-' if target is None else '>= ' + str(target):7s} "
                f"{'' if ok is None else ('PASS' if ok else 'FAIL')}"
            )
            if ok is not None:
                verdicts.append(ok)
        short, long_ = (10, 40) if args.quick else (20, 80)
        extra = memory_growth(Path(tmp) / "memory", short, long_)
        growth = extra[long_] / extra[short]
        print(
            f"eiger500K_single, process_run peak RSS growth: {short} frames "
            f"+{extra[short] / 2**20:.1f} MiB, {long_} frames +{extra[long_] / 2**20:.1f} MiB"
        )
        ok = growth <= 1.3
        print(
            f"    {'peak RSS ' + str(long_) + ' / ' + str(short) + ' frames':32s} "
            f"{growth:7.3f}  target <= 1.3   {'PASS' if ok else 'FAIL'}"
        )
        verdicts.append(ok)
    print(f"{sum(verdicts)}/{len(verdicts)} targets met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
