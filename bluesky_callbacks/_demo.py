"""The project's main job end to end, behind ``chx-masks demo``: masks, a scan, a replay.

Run by the CLI in a directory of its own: an embedded registry and a run store
that nothing else uses, so the demo never changes the user's masks or active
sets (nor a facility server named by ``CHX_MASKS_URI``). It makes the masks a
CHX Eiger 4M needs, runs a scan through the RunEngine with the preprocessor,
the masking router and TiledWriter, replays the stored run and checks the
replay equals what was masked live. Running it again registers nothing new:
the masks are made the same way and identical content is reused.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from chx_masks import ChxMasksError, MaskNotFoundError, MaskRegistry, generate, mask_sha256
from chx_masks.plot import composite_png, frame_png

from ._provenance import MaskProvenance
from ._replay import open_run_store, replay_masked
from ._router import MaskingRouter
from .sim import CHX_EIGER_SHAPES, XPCSPattern

DETECTOR = "eiger4m_single_image"
#: The demo's masks, in the order the composite ANDs them.
NAMES = ("demo_module_gaps", "demo_hot_pixels", "demo_beamstop", "demo_beamstop_arm")

Echo = Callable[[str], None]
Progress = Callable[[str, int], Any]


@dataclass(frozen=True)
class DemoSummary:
    """What ``chx-masks demo`` did: runs, masks, checks, speed and pictures."""

    registry: str
    directory: str
    runs: str
    raw_uid: str
    derived_uid: str
    replay_uid: str
    frames: int
    masks: dict[str, dict[str, Any]]
    composite_sha256: str
    masked_fraction: float
    replay_equal: bool
    lazy_equal: bool
    router_frames_per_second: float
    scan_router_frames_per_second: float
    seconds: float
    pngs: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


def _no_progress(label: str, total: int) -> Any:
    class _Bar:
        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def update(self, n: int) -> None:
            return None

    return _Bar()


def dark_series(
    n_frames: int, hot: np.ndarray, *, seed: int = 11, progress: Progress = _no_progress
) -> np.ndarray:
    """Dark frames of a 4M: sparse background counts plus the detector's hot pixels.

    Examples
    --------
    >>> hot = np.zeros((4, 5), bool); hot[1, 2] = True
    >>> darks = dark_series(3, hot)
    >>> darks.shape, int(darks[:, 1, 2].min()) >= 200
    ((3, 4, 5), True)
    """
    rng = np.random.default_rng(seed)
    darks = np.empty((n_frames, *hot.shape), dtype=np.uint32)
    with progress("simulating a dark series", n_frames) as bar:
        for i in range(n_frames):
            darks[i] = rng.poisson(0.01, size=hot.shape)
            darks[i][hot] += rng.poisson(250, size=int(hot.sum())).astype(np.uint32)
            bar.update(1)
    return darks


def demo_pattern() -> XPCSPattern:
    """The demo's Eiger 4M frames: XPCS speckle at 0.05 photons per pixel."""
    return XPCSPattern(CHX_EIGER_SHAPES["eiger4m_single"], np.dtype(np.uint32))


def make_masks(
    registry: MaskRegistry, *, progress: Progress = _no_progress, echo: Echo = print
) -> dict[str, str]:
    """Register the demo's four masks; return name -> uid.

    A mask whose current version already holds the same content is reused, so
    running the demo again adds no versions.
    """
    pattern = demo_pattern()
    shape = pattern.shape
    gaps = generate.module_gaps(DETECTOR)
    # The simulated detector has hot and dead pixels outside the gaps; find
    # them the way staff do, from a dark series.
    hot_truth = pattern.bad_pixels & gaps.mask
    darks = dark_series(10, hot_truth, progress=progress)
    hot = generate.hot_dead_pixels(darks, hot_threshold=50)
    centre = (int(0.55 * shape[0]), int(0.45 * shape[1]))
    beamstop = generate.circle(shape, center=centre, radius=45)
    arm = generate.rectangle(shape, (0, centre[1] - 8), (centre[0], centre[1] + 8))
    made = dict(zip(NAMES, (gaps, hot, beamstop, arm), strict=True))
    uids = {}
    for name, generated in made.items():
        md = {"made_by": "chx-masks demo"}
        try:
            current = registry.describe(registry.get_mask_uid(DETECTOR, name))
        except MaskNotFoundError:
            current = None
        if current is None:
            uids[name] = generated.register(registry, DETECTOR, name, metadata=md)
            verb = "registered"
        elif current.sha256 == mask_sha256(generated.mask):
            uids[name] = current.uid
            verb = "unchanged"
        else:
            uids[name] = generated.register(registry, DETECTOR, name, update=True, metadata=md)
            verb = "updated"
        record = registry.describe(uids[name])
        echo(
            f"  {verb:<10} {DETECTOR}/{name:<18} v{record.version:<3} "
            f"{record.uid[:8]}  masks {record.masked_pixels:>9,} px "
            f"({record.masked_fraction:.3%})"
        )
    return uids


class _Timed:
    """Measures the time the router itself spends on frames, downstream excluded."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.frames = 0
        self._downstream = 0.0
        self.router: MaskingRouter | None = None

    def downstream(self, callback: Callable[[str, dict], Any]) -> Callable[[str, dict], None]:
        def timed(name: str, doc: dict) -> None:
            t0 = time.perf_counter()
            callback(name, doc)
            self._downstream += time.perf_counter() - t0

        return timed

    def __call__(self, name: str, doc: dict) -> None:
        assert self.router is not None
        self._downstream = 0.0
        t0 = time.perf_counter()
        self.router(name, doc)
        if name in ("event", "event_page", "stream_datum"):
            self.seconds += time.perf_counter() - t0 - self._downstream
            if name == "stream_datum":
                self.frames += doc["indices"]["stop"] - doc["indices"]["start"]
            elif name == "event_page":
                self.frames += len(doc["seq_num"])
            else:
                self.frames += 1


class _RawDocuments:
    """Keeps a run's documents, with at most ``limit`` events (frames are large)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.docs: list[tuple[str, dict]] = []
        self.events = 0

    def __call__(self, name: str, doc: dict) -> None:
        if name == "event":
            self.events += 1
            if self.events > self.limit:
                return
        self.docs.append((name, doc))


def router_alone(registry: MaskRegistry, docs: list[tuple[str, dict]]) -> float:
    """Frames per second of a :class:`MaskingRouter` alone on a run's documents."""
    router = MaskingRouter(registry, lambda name, doc: None, strict=True)
    seconds, frames = 0.0, 0
    for name, doc in docs:
        t0 = time.perf_counter()
        router(name, doc)
        if name in ("event", "stream_datum"):
            seconds += time.perf_counter() - t0
            frames += (
                doc["indices"]["stop"] - doc["indices"]["start"] if name == "stream_datum" else 1
            )
    return frames / seconds if seconds else 0.0


class _FrameDigests:
    """A downstream that keeps the sha256 of every masked frame, not the frames."""

    def __init__(self) -> None:
        self.digests: list[str] = []
        self.start: dict | None = None
        self.total: np.ndarray | None = None
        self.stop: dict | None = None

    def __call__(self, name: str, doc: dict) -> None:
        if name == "start":
            self.start = doc
        elif name == "stop":
            self.stop = doc
        elif name in ("event", "event_page"):
            frames = doc["data"].get(DETECTOR)
            if frames is None:
                return
            frames = [frames] if name == "event" else frames
            for frame in frames:
                frame = np.asarray(frame)
                frame = frame.reshape(frame.shape[-2:])  # ophyd-async events: (1, rows, cols)
                if self.total is None:
                    self.total = np.zeros(frame.shape, np.int64)
                self.total += frame
                self.digests.append(hashlib.sha256(frame.tobytes()).hexdigest())


def run_demo(
    directory: str | Path,
    *,
    frames: int = 20,
    echo: Echo = print,
    progress: Progress = _no_progress,
) -> DemoSummary:
    """Masks, a live masked scan, the stored run replayed and compared, pictures.

    Everything happens in ``directory``: it is the demo's own embedded
    registry (``catalog.db``, ``data/``), with ``frames/`` (the simulated
    Eiger 4M's DECTRIS files: master and bitshuffle-LZ4 data files of sparse
    XPCS frames, as the CHX Eigers write them), ``runs/`` (the tiled store of
    the raw and masked runs) and the PNGs beside. No other registry is
    opened, so the user's masks and active sets stay as they are.

    Parameters
    ----------
    directory : path
        The demo's directory (created if needed). ``chx-masks --dir
        DIRECTORY list`` shows its masks and ``chx-masks --dir DIRECTORY
        process RUN_UID`` processes its runs.
    frames : int
        Frames in the scan (4M, uint32: 18 MB each).
    echo, progress : callables
        Where lines go; ``progress(label, total)`` returns a context manager
        with ``update(n)`` (``click.progressbar`` fits).

    Examples
    --------
    >>> import tempfile
    >>> run_demo(tempfile.mkdtemp(), frames=2).replay_equal  # doctest: +SKIP
    True
    """
    if frames < 1:
        raise ChxMasksError(f"frames must be at least 1, not {frames}.")
    t0 = time.perf_counter()
    out = Path(directory).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    with MaskRegistry.embedded(out) as registry:
        return _run(registry, out, frames, echo, progress, t0)


def _run(
    registry: MaskRegistry, out: Path, frames: int, echo: Echo, progress: Progress, t0: float
) -> DemoSummary:
    from bluesky import RunEngine
    from bluesky.plans import count
    from bluesky_tiled_plugins import TiledWriter
    from ophyd_async.plan_stubs import ensure_connected

    from ._replay import _stream_node, masked_frames, run_composite
    from ._sim_async import SimAsyncEiger

    echo(f"the demo's own registry and runs: {out} (your registry is not used)")
    echo("1. masks for a simulated Eiger 4M")
    uids = make_masks(registry, progress=progress, echo=echo)
    active = registry.active_set(DETECTOR)
    if active is None or active.names != NAMES:
        active = registry.activate(DETECTOR, list(NAMES), note="chx-masks demo")
    echo(f"  active set v{active.version}: {', '.join(NAMES)}")

    echo(
        f"2. a {frames}-frame scan of an Eiger 4M writing DECTRIS files (bitshuffle-LZ4): "
        "RunEngine + MaskProvenance + MaskingRouter + TiledWriter"
    )
    store = open_run_store(out / "runs", readable_storage=[out / "frames"])
    engine = RunEngine({})
    try:
        engine.preprocessors.append(MaskProvenance(registry))
        live = _FrameDigests()
        timed = _Timed()
        timed.router = MaskingRouter(
            registry,
            [timed.downstream(live), timed.downstream(TiledWriter(store))],
            strict=True,
        )
        raw_docs = _RawDocuments(limit=10)
        engine.subscribe(raw_docs)
        engine.subscribe(TiledWriter(store))
        engine.subscribe(timed)
        det = SimAsyncEiger(
            "eiger4m_single",
            out / "frames",
            pattern=demo_pattern(),
            frames_per_file=max(1, (frames + 1) // 2),
        )
        engine(ensure_connected(det))
        with progress("scanning", frames) as bar:
            token = engine.subscribe(lambda name, doc: bar.update(1), "event")
            # RunEngine({}) returns the run's uids (call_returns_result is False).
            run_uids = cast(
                tuple[str, ...], engine(count([det], num=frames, md={"sample": "demo"}))
            )
            (raw_uid,) = run_uids
            engine.unsubscribe(token)
        start = live.start
        assert start is not None and live.stop is not None
        raw_start = store[raw_uid].metadata["start"]
        record = raw_start["masks"][DETECTOR]
        echo(
            f"  raw run {raw_uid}: masks {record['names']} v{record['versions']} "
            f"({record['chosen_by']})"
        )
        echo(
            f"  masked run {start['uid']} (parent_uid {start['parent_uid'][:8]}), "
            f"{len(live.digests)} frames, stop: {live.stop['exit_status']}"
        )

        alone = router_alone(registry, raw_docs.docs)
        during = timed.frames / timed.seconds if timed.seconds else 0.0
        raw_docs.docs.clear()
        echo(
            f"  router: {alone:,.0f} frames/s alone; {during:,.0f} frames/s during the scan, "
            "sharing this process with the tiled server storing both runs"
        )

        echo("3. replay of the stored raw run from tiled")
        replayed = _FrameDigests()
        with progress("replaying", frames) as bar:
            replay_uid = replay_masked(
                store[raw_uid],
                replayed,
                registry=registry,
                progress=lambda done, total: bar.update(1) if done else None,
            )
        replay_equal = replayed.digests == live.digests and len(live.digests) == frames
        lazy = masked_frames(store[raw_uid], DETECTOR, registry=registry)
        composite = run_composite(raw_start, DETECTOR, registry=registry)
        lazy_first = np.asarray(lazy[0].compute()).reshape(composite.mask.shape)
        lazy_equal = hashlib.sha256(lazy_first.tobytes()).hexdigest() == live.digests[0]
        echo(
            f"  replayed frames equal the live masked frames: {replay_equal}; "
            f"lazy dask path agrees: {lazy_equal}"
        )

        echo("4. pictures")
        # One sparse frame holds about 0.05 photons per pixel: the pictures
        # show the run's frames summed, as a time-averaged pattern.
        raw_node = _stream_node(store[raw_uid], "primary", DETECTOR)
        raw_total = np.zeros(composite.mask.shape, np.int64)
        for i in range(frames):
            raw_total += np.asarray(raw_node[i]).reshape(raw_total.shape)
        # The Eiger writes its flag value (the dtype's maximum) where its own
        # pixel_mask says so: drawn crimson, from the run's master file.
        from chx_masks.io import read_mask

        master_file = det.master_file
        if master_file is None:
            raise RuntimeError("The simulated Eiger wrote no master file.")
        flagged_by_detector, _ = read_mask(master_file)
        total = live.total
        if total is None:
            raise RuntimeError("The masked run carried no frames.")
        pngs = {
            "composite": composite_png(composite, out / "composite_mask.png"),
            "raw_frame": frame_png(
                raw_total,
                out / "raw_frame.png",
                mask=flagged_by_detector,
                title=f"{DETECTOR} raw, {frames} frames summed (run {raw_uid[:8]}); "
                "crimson: the detector's pixel_mask",
            ),
            "masked_frame": frame_png(
                total,
                out / "masked_frame.png",
                mask=composite.mask,
                title=f"{DETECTOR} masked, {frames} frames summed (run {start['uid'][:8]})",
            ),
        }
    finally:
        engine.loop.call_soon_threadsafe(engine.loop.stop)
        store.context.close()
    masks = {
        name: {"uid": uid, "version": registry.describe(uid).version} for name, uid in uids.items()
    }
    summary = DemoSummary(
        registry=registry.location,
        directory=str(out),
        runs=str(out / "runs"),
        raw_uid=raw_uid,
        derived_uid=start["uid"],
        replay_uid=replay_uid,
        frames=frames,
        masks=masks,
        composite_sha256=composite.sha256,
        masked_fraction=float((~composite.mask).mean()),
        replay_equal=bool(replay_equal),
        lazy_equal=bool(lazy_equal),
        router_frames_per_second=alone,
        scan_router_frames_per_second=during,
        seconds=time.perf_counter() - t0,
        pngs={k: str(v) for k, v in pngs.items()},
    )
    return summary
