"""4. scale: get_mask_uid and resolve_composite on a registry of 10 masks against one of 10,000."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from harness import CACHE, REPO, Fixtures, Ratio, fmt_s, interleaved, judged, line, show

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
