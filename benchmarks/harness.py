"""The benchmarks' shared harness: results and verdicts, interleaved timing, fixtures.

Imported by ``run.py`` and the ``bench_*`` modules (``benchmarks/`` is on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
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


def split_run(docs: list) -> tuple[dict, dict, list[dict], dict]:
    start = next(d for n, d in docs if n == "start")
    descriptor = next(d for n, d in docs if n == "descriptor")
    events = [d for n, d in docs if n == "event"]
    stop = next(d for n, d in docs if n == "stop")
    return start, descriptor, events, stop


# The metadata of the plan whose run start is timed (run_start, memory).
RUN_MD = {"plan_name": "count", "detectors": ["eiger4m_single"], "num_points": 100}


# --------------------------------------------------------------------------- subprocesses


def run_child(*args: str, mask_cache: Path | None = None) -> dict:
    """Run ``run.py --child ARGS`` in a fresh interpreter; ``mask_cache``: its local copies."""
    env = dict(os.environ)
    if mask_cache is not None:
        env["CHX_MASKS_CACHE_DIR"] = str(mask_cache)
    out = subprocess.run(
        [sys.executable, str(HERE / "run.py"), "--child", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def proc_status(field_name: str) -> int:
    for text in Path("/proc/self/status").read_text().splitlines():
        if text.startswith(field_name + ":"):
            return int(text.split()[1]) * 1024
    raise KeyError(field_name)


# --------------------------------------------------------------------------- machine


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


# --------------------------------------------------------------------------- output


def print_machine(info: dict[str, Any], quick: bool) -> None:
    """The top of the output: when, on what, at which revision, how busy."""
    print("chx-masks benchmarks" + (" (--quick)" if quick else ""))
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


def print_summary(
    results: list[Ratio], errors: dict[str, str], total: float, info: dict[str, Any]
) -> None:
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


def save_json(
    path: Path,
    info: dict[str, Any],
    quick: bool,
    total: float,
    timings: dict[str, float],
    results: list[Ratio],
    errors: dict[str, str],
) -> None:
    """Machine info and every number of the run, as ``--json`` writes them."""
    path.write_text(
        json.dumps(
            {
                "machine": info,
                "quick": quick,
                "seconds": total,
                "timings": timings,
                "results": [asdict(r) for r in results],
                "errors": errors,
            },
            indent=2,
            default=str,
        )
    )
