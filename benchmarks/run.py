"""Side-by-side performance measurements of chx-masks against baselines and a peer.

Run by developers and CI-like checks, never by pytest (no file here is named
``test_*`` and ``benchmarks/`` is outside pytest's testpaths)::

    python benchmarks/run.py                 # the seven measurements (~5-10 min)
    python benchmarks/run.py --quick         # a smoke run (minutes, once .cache/ is filled)
    python benchmarks/run.py --only live --json results.json

Every comparison runs its contenders in this one process, interleaved
(A, B, C, B, C, A, ...), and reports the ratio of their medians together with
its target and PASS/FAIL. Absolute numbers are printed too, but only the ratios
travel between machines. This file is the command line; the harness is
``harness.py`` and each measurement is a ``bench_*.py`` module. See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench_live import bench_live
from bench_memory import bench_memory, child_memory
from bench_peer import bench_peer
from bench_process import bench_process, child_process
from bench_replay import bench_replay
from bench_run_start import bench_run_start, child_cold
from bench_scale import bench_scale
from harness import (
    CACHE,
    Fixtures,
    Ratio,
    line,
    machine_info,
    print_machine,
    print_summary,
    quiet,
    save_json,
)

MEASUREMENTS = ("live", "peer", "run_start", "scale", "replay", "memory", "process")
TITLES = {
    "live": "live masking: MaskingRouter on eiger4m event_pages vs np.copyto and frame*mask",
    "peer": "peer: MaskingRouter vs bluesky-darkframes DarkSubtraction, same event_pages",
    "run_start": "run start: MaskProvenance at open_run vs a naive tiled client, cold & warm",
    "scale": "scale: get_mask_uid / resolve_composite with 10 vs 10,000 masks",
    "replay": "replay: masked_frames of a stored eiger1m run vs the same frames unmasked",
    "memory": "memory: peak RSS of the live router over a 4M scan",
    "process": "process: end-of-run sparse product, bounded chunks vs read-it-all",
}
# What ``run.py --child KIND ARGS...`` runs in a fresh interpreter (see harness.run_child).
CHILDREN = {"cold": child_cold, "memory": child_memory, "process": child_process}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short smoke run (minutes, once benchmarks/.cache is filled)",
    )
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
            CHILDREN[kind](*rest)
        return 0

    info = machine_info()
    print_machine(info, args.quick)

    selected = args.only or list(MEASUREMENTS)
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
                print(f"\n[{i + 1}/{len(selected)}] {TITLES[name]}", flush=True)
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

    print_summary(results, errors, total, info)
    if args.json:
        save_json(args.json, info, args.quick, total, timings, results, errors)
        print(f"results saved to {args.json}")
    # A missed target is information, not a crash: only errors change the exit status.
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
