"""3. run_start: MaskProvenance at open_run against a naive tiled client, cold and warm."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import (
    K4M,
    NAMES_4M,
    RUN_MD,
    Fixtures,
    Ratio,
    fmt_s,
    interleaved,
    judged,
    line,
    make_registry,
    run_child,
    show,
)


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
