"""5. replay: masked_frames of a stored Eiger 1M run against the same frames read unmasked."""

from __future__ import annotations

import time

import numpy as np
from harness import K1M, NAMES_1M, Fixtures, Ratio, fmt_s, interleaved, judged, line, show


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
